"""Tables for change_settings' pure decisions (tasks/planning/settings.py): PostgreSQL's value
syntax, what each change needs, the rolling restart order and the plan artifact."""

from __future__ import annotations

import pytest

from tasks.adapters.ha.base import ClusterView, Member
from tasks.planning.settings import (
    RestartStep,
    SettingChange,
    SettingRow,
    SettingsPlanError,
    member_needs_restart,
    needs_restart,
    not_yet_in_effect,
    not_yet_reloaded,
    ownership_refusals,
    parse_bool,
    plan_cluster_settings,
    plan_settings,
    restart_order,
    settings_plan,
    show,
    validate_settings,
)


def row(name: str, setting: str, unit: str | None = None, vartype: str = "integer", min_val: str | None = None,
        max_val: str | None = None, enumvals: tuple[str, ...] = (), context: str = "user",
        pending_restart: bool = False) -> SettingRow:
    return SettingRow(name, setting, unit, vartype, min_val, max_val, enumvals, context, pending_restart)


# As a PostgreSQL 16 on x86-64 with 8 kB blocks lists them in pg_settings.
ROWS = {r.name: r for r in (
    row("work_mem", "4096", "kB", min_val="64", max_val="2147483647"),
    row("shared_buffers", "16384", "8kB", min_val="16", max_val="1073741823", context="postmaster"),
    row("wal_buffers", "-1", "8kB", min_val="-1", max_val="262143", context="postmaster"),
    row("log_rotation_size", "10240", "kB", min_val="0", max_val="2097151", context="sighup"),
    row("min_wal_size", "80", "MB", min_val="2", max_val="2147483647", context="sighup"),
    row("log_parameter_max_length", "-1", "B", min_val="-1", max_val="1073741823", context="superuser"),
    row("statement_timeout", "0", "ms", min_val="0", max_val="2147483647"),
    row("checkpoint_timeout", "300", "s", min_val="30", max_val="86400", context="sighup"),
    row("log_rotation_age", "1440", "min", min_val="0", max_val="35791394", context="sighup"),
    row("tcp_keepalives_idle", "0", "s", min_val="0", max_val="2147483647"),
    row("vacuum_cost_delay", "0", "ms", "real", "0", "100"),
    row("random_page_cost", "4", None, "real", "0", "1.79769e+308"),
    row("max_connections", "100", None, min_val="1", max_val="262143", context="postmaster"),
    row("max_wal_senders", "10", None, min_val="0", max_val="262143", context="postmaster"),
    row("unix_socket_permissions", "0777", None, min_val="0", max_val="511", context="postmaster"),
    row("server_version_num", "160004", None, min_val="160004", max_val="160004", context="internal"),
    row("hot_standby_feedback", "off", None, "bool", context="sighup"),
    row("log_connections", "off", None, "bool", context="superuser-backend"),
    row("ignore_system_indexes", "off", None, "bool", context="backend"),
    row("wal_level", "replica", None, "enum", enumvals=("minimal", "replica", "logical"), context="postmaster"),
    row("synchronous_commit", "on", None, "enum",
        enumvals=("local", "remote_write", "remote_apply", "on", "off")),
    row("search_path", '"$user", public', None, "string"),
    row("shared_preload_libraries", "pg_stat_statements", None, "string", context="postmaster"),
)}


def one(name: str, value: str) -> list[str]:
    return validate_settings({name: value}, ROWS)


# --- parse_bool: bool.c parse_bool_with_len -------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("on", True), ("off", False), ("ON", True), ("Off", False),
    ("true", True), ("t", True), ("tr", True), ("TRUE", True),
    ("false", False), ("f", False), ("fals", False),
    ("yes", True), ("y", True), ("no", False), ("n", False),
    ("1", True), ("0", False), ("of", False),
    ("o", None), ("onn", None), ("offf", None), ("truex", None), ("nope", None), ("10", None), ("00", None),
    ("", None), (" on", None), ("on ", None), ("enable", None), ("\u212a", None),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_parse_bool(value, expected) -> None:
    assert parse_bool(value) is expected


# --- numbers with units: guc.c parse_int / parse_real / convert_to_base_unit ----------------------

@pytest.mark.parametrize("name, value, base", [
    ("work_mem", "64MB", 65536),
    ("work_mem", "4096", 4096),
    ("work_mem", "1 MB", 1024),
    ("work_mem", "2048 kB ", 2048),
    ("work_mem", " 64MB", 65536),
    ("work_mem", "1TB", 1024 ** 3),
    ("work_mem", "65536B", 64),
    ("work_mem", "30.1GB", 30822 * 1024),          # rounded to whole MB first, as PostgreSQL does
    ("log_rotation_size", "1.5", 2),               # integers round half to even (rint)
    ("log_rotation_size", "2.5", 2),
    ("work_mem", ".5MB", 512),
    ("work_mem", "1e3", 1000),
    ("work_mem", "0x100", 256),                    # strtol base 0: hex
    ("work_mem", "0100", 64),                      # and octal
    ("work_mem", "+128", 128),
    ("shared_buffers", "128MB", 16384),            # 8 kB blocks
    ("shared_buffers", "1GB", 131072),
    ("wal_buffers", "8kB", 1),
    ("wal_buffers", "-1", -1),
    ("min_wal_size", "1GB", 1024),
    ("log_parameter_max_length", "1kB", 1024),
    ("statement_timeout", "1.5s", 1500),
    ("statement_timeout", "1min", 60000),
    ("statement_timeout", "1d", 86_400_000),
    ("statement_timeout", "1500us", 2),
    ("checkpoint_timeout", "5min", 300),
    ("checkpoint_timeout", "1h", 3600),
    ("checkpoint_timeout", "30000ms", 30),
    ("tcp_keepalives_idle", "1500ms", 2),          # 1.5 s rounds half to even: 2
    ("tcp_keepalives_idle", "2500ms", 2),
    ("log_rotation_age", "1d", 1440),
    ("log_rotation_age", "90s", 2),                # 1.5 min rounds half to even: 2
    ("vacuum_cost_delay", "0.5ms", 0.5),
    ("vacuum_cost_delay", "500us", 0.5),
    ("vacuum_cost_delay", "2", 2.0),
    ("random_page_cost", "1.1", 1.1),
    ("random_page_cost", "1e2", 100.0),
    ("random_page_cost", "0x1.8p1", 3.0),          # strtod reads hex floats
    ("max_connections", "0x10", 16),
], ids=lambda v: v if isinstance(v, str) else None)
def test_numbers_accepted(name, value, base) -> None:
    assert one(name, value) == []
    [change] = plan_settings({name: value}, ROWS)
    assert change.value == value
    if ROWS[name].unit:
        assert change.new == show(ROWS[name], base)


@pytest.mark.parametrize("name, value, refused", [
    ("work_mem", "64mb", "units are B, kB, MB, GB, TB (case matters)"),
    ("work_mem", "64KB", "case matters"),
    ("work_mem", "64 MBytes", "has no unit PostgreSQL takes here"),
    ("work_mem", "64MB x", "has no unit PostgreSQL takes here"),
    ("work_mem", "64s", "units are B, kB, MB, GB, TB"),
    ("statement_timeout", "1m", "units are us, ms, s, min, h, d"),
    ("statement_timeout", "5MB", "units are us, ms, s, min, h, d"),
    ("work_mem", "08", "has no unit"),             # octal 0, then the garbage '8'
    ("work_mem", "09.5", "has no unit"),
    ("work_mem", " .5", "is not a number"),        # strtol stops before the space, strtod never runs
    ("work_mem", "", "is not a number"),
    ("work_mem", "MB", "is not a number"),
    ("work_mem", "1,024", "has no unit"),
    ("work_mem", "nan", "is not a number"),
    ("random_page_cost", "NaN", "is not a number"),
    ("random_page_cost", "1e400", "is not a number"),    # ERANGE
    ("random_page_cost", "1e-400", "is not a number"),   # underflow is ERANGE too
    ("random_page_cost", "0x1p99999", "is not a number"),  # a hex float's overflow as well
    ("random_page_cost", "abc", "is not a number"),
    ("random_page_cost", "", "is not a number"),
    ("work_mem", "3000000000", "exceeds the integer range"),
    ("work_mem", "99999999999999999999", "exceeds the integer range"),
    ("work_mem", "inf", "is not a number"),        # strtol converts nothing and stops at 'i'
    ("work_mem", "32kB", "is 32 kB, outside 64 .. 2147483647 kB"),
    ("work_mem", "3TB", "exceeds the integer range"),
    ("checkpoint_timeout", "10s", "is 10 s, outside 30 .. 86400 s"),
    ("checkpoint_timeout", "2d", "is 172800 s, outside 30 .. 86400 s"),
    ("shared_buffers", "64kB", "is 8 8kB, outside 16 .. 1073741823 8kB"),
    ("vacuum_cost_delay", "1s", "is 1000 ms, outside 0 .. 100 ms"),
    ("random_page_cost", "-1", "is -1, outside 0 .. 1.79769e+308"),
    ("random_page_cost", "inf", "is inf, outside"),
    ("max_connections", "0", "is 0, outside 1 .. 262143"),
    ("max_connections", "200MB", "takes no unit"),
    ("random_page_cost", "1.1x", "takes no unit"),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_numbers_refused(name, value, refused) -> None:
    [refusal] = one(name, value)
    assert refusal.startswith(f"parameters.{name}: {value!r} ") and refused in refusal, refusal


# --- every other refusal --------------------------------------------------------------------------

@pytest.mark.parametrize("requested, refused", [
    ({}, "parameters: no parameter given"),
    ({"work_mme": "8MB"}, "parameters.work_mme: PostgreSQL has no such parameter; did you mean work_mem?"),
    ({"shared_bufers": "1GB"}, "did you mean shared_buffers?"),
    ({"no_such_thing_at_all": "1"}, "parameters.no_such_thing_at_all: PostgreSQL has no such parameter"),
    ({"server_version_num": "170000"}, "parameters.server_version_num: fixed when PostgreSQL was built"),
    ({"work_mem": "8MB", "WORK_MEM": "16MB"}, "parameters.WORK_MEM: given twice (also as work_mem)"),
    ({"hot_standby_feedback": "maybe"}, "'maybe' is no Boolean"),
    ({"hot_standby_feedback": "o"}, "unique prefix"),
    ({"wal_level": "hot_standby"}, "'hot_standby' is not one of minimal, replica, logical"),
    ({"wal_level": "minimal"}, "parameters.wal_level: 'minimal' would stream nothing to the standbys"),
    ({"wal_level": "MINIMAL"}, "would stream nothing"),
    ({"synchronous_commit": "true"}, "'true' is not one of local, remote_write, remote_apply, on, off"),
    ({"search_path": "app,\npublic"}, "holds a control character or newline"),
    ({"search_path": "app\r"}, "control character"),
    ({"shared_preload_libraries": "a\x00b"}, "control character"),
    ({"search_path": "app\u2028public"}, "newline"),
    ({"work_mem": "64\tMB"}, "control character"),
    ({"work_mem": 64}, "parameters.work_mem: give the value as text"),
], ids=["empty", "typo", "typo-2", "unknown", "internal", "twice", "bool", "bool-o", "enum", "wal-minimal",
        "wal-minimal-case", "enum-hidden-alias", "newline", "cr", "nul", "line-separator", "tab-in-number",
        "not-text"])
def test_refusals(requested, refused) -> None:
    refusals = validate_settings(requested, ROWS)
    assert len(refusals) == 1 and refused in refusals[0], refusals


def test_one_refusal_per_bad_parameter_and_none_for_the_good() -> None:
    refusals = validate_settings({"work_mem": "8mb", "random_page_cost": "1.1", "wal_level": "x",
                                  "nope": "1"}, ROWS)
    assert [r.split(":")[0] for r in refusals] == ["parameters.work_mem", "parameters.wal_level", "parameters.nope"]


@pytest.mark.parametrize("bad", [row("x", "1", context="sometime"), row("x", "1", vartype="complex")],
                         ids=["context", "vartype"])
def test_an_unknown_context_or_type_is_refused(bad) -> None:
    [refusal] = validate_settings({"x": "1"}, {"x": bad})
    assert "not one bouwsteen knows" in refusal


def test_a_row_unit_bouwsteen_does_not_know_is_refused() -> None:
    [refusal] = validate_settings({"x": "1GB"}, {"x": row("x", "1", unit="furlong")})
    assert "its unit 'furlong' is not one bouwsteen knows" in refusal


@pytest.mark.parametrize("name, value", [
    ("Work_Mem", "8MB"), ("wal_level", "Logical"), ("synchronous_commit", "REMOTE_APPLY"),
    ("search_path", "app, public"), ("search_path", ""),
    ("shared_preload_libraries", "pg_stat_statements,auto_explain"),
], ids=["name-case", "enum-case", "enum-upper", "string", "empty-string", "postmaster-string"])
def test_accepted(name, value) -> None:
    assert one(name, value) == []


# --- SHOW rendering -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, base, shown", [
    ("work_mem", None, "4MB"),
    ("work_mem", 1025, "1025kB"),
    ("work_mem", 1024 ** 2, "1GB"),
    ("work_mem", 0, "0"),
    ("shared_buffers", None, "128MB"),
    ("shared_buffers", 1, "8kB"),
    ("shared_buffers", 3, "24kB"),
    ("wal_buffers", None, "-1"),
    ("log_parameter_max_length", 2048, "2kB"),
    ("log_parameter_max_length", 100, "100B"),
    ("min_wal_size", None, "80MB"),
    ("min_wal_size", 2048, "2GB"),
    ("statement_timeout", None, "0"),
    ("statement_timeout", 1500, "1500ms"),
    ("statement_timeout", 90_000, "90s"),
    ("statement_timeout", 3_600_000, "1h"),
    ("checkpoint_timeout", None, "5min"),
    ("log_rotation_age", None, "1d"),
    ("vacuum_cost_delay", 0.5, "500us"),
    ("vacuum_cost_delay", 2.0, "2ms"),
    ("vacuum_cost_delay", 0.0, "0"),
    ("random_page_cost", None, "4"),
    ("random_page_cost", 0.1234567, "0.123457"),
    ("unix_socket_permissions", None, "0777"),
    ("hot_standby_feedback", True, "on"),
    ("hot_standby_feedback", None, "off"),
    ("wal_level", None, "replica"),
    ("search_path", None, '"$user", public'),
], ids=lambda v: v if isinstance(v, str) else None)
def test_show(name, base, shown) -> None:
    assert show(ROWS[name], base) == shown


# --- what each change needs -----------------------------------------------------------------------

@pytest.mark.parametrize("name, value, needs, old, new", [
    ("work_mem", "4MB", "nothing", "4MB", "4MB"),
    ("work_mem", "4096kB", "nothing", "4MB", "4MB"),
    ("work_mem", "4096", "nothing", "4MB", "4MB"),
    ("work_mem", "0x1000", "nothing", "4MB", "4MB"),
    ("work_mem", "8MB", "reload", "4MB", "8MB"),
    ("log_parameter_max_length", "1kB", "reload", "-1", "1kB"),
    ("checkpoint_timeout", "300s", "nothing", "5min", "5min"),
    ("checkpoint_timeout", "10min", "reload", "5min", "10min"),
    ("shared_buffers", "128MB", "nothing", "128MB", "128MB"),
    ("shared_buffers", "16384", "nothing", "128MB", "128MB"),
    ("shared_buffers", "1GB", "restart", "128MB", "1GB"),
    ("max_connections", "100", "nothing", "100", "100"),
    ("max_connections", "200", "restart", "100", "200"),
    ("unix_socket_permissions", "511", "nothing", "0777", "511"),     # the show hook's octal, read as such
    ("unix_socket_permissions", "0700", "restart", "0777", "0700"),
    ("random_page_cost", "4.0", "nothing", "4", "4.0"),
    ("random_page_cost", "1.1", "reload", "4", "1.1"),
    ("vacuum_cost_delay", "0", "nothing", "0", "0"),
    ("vacuum_cost_delay", "0.5ms", "reload", "0", "500us"),
    ("hot_standby_feedback", "no", "nothing", "off", "off"),
    ("hot_standby_feedback", "t", "reload", "off", "on"),
    ("log_connections", "on", "reload", "off", "on"),                 # superuser-backend
    ("ignore_system_indexes", "yes", "reload", "off", "on"),          # backend
    ("wal_level", "REPLICA", "nothing", "replica", "replica"),
    ("wal_level", "logical", "restart", "replica", "logical"),
    ("synchronous_commit", "ON", "nothing", "on", "on"),
    ("synchronous_commit", "remote_apply", "reload", "on", "remote_apply"),
    ("search_path", '"$user", public', "nothing", '"$user", public', '"$user", public'),
    ("search_path", '"$user",public', "reload", '"$user", public', '"$user",public'),
    ("shared_preload_libraries", "pg_stat_statements,auto_explain", "restart", "pg_stat_statements",
     "pg_stat_statements,auto_explain"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_needs(name, value, needs, old, new) -> None:
    [change] = plan_settings({name: value}, ROWS)
    assert (change.needs, change.old, change.new, change.value) == (needs, old, new, value)


@pytest.mark.parametrize("context, needs", [
    ("sighup", "reload"), ("superuser", "reload"), ("user", "reload"), ("backend", "reload"),
    ("superuser-backend", "reload"), ("postmaster", "restart"),
], ids=lambda v: v)
def test_needs_by_context(context, needs) -> None:
    rows = {"p": row("p", "1", context=context, min_val="0", max_val="10")}
    assert [c.needs for c in plan_settings({"p": "2"}, rows)] == [needs]
    assert [c.needs for c in plan_settings({"p": "1"}, rows)] == ["nothing"]


def test_reals_compare_as_pg_settings_prints_them() -> None:
    # After setting 0.1234567 pg_settings shows 0.123457: the second run must change nothing.
    rows = {"p": row("p", "0.123457", vartype="real", min_val="0", max_val="1")}
    assert [c.needs for c in plan_settings({"p": "0.1234567"}, rows)] == ["nothing"]


@pytest.mark.parametrize("pending, value, needs, clears", [
    (True, "100", "reload", True),       # the file holds another value: write the running one back
    (True, "200", "restart", False),
    (False, "100", "nothing", False),
], ids=["pending-back-to-running", "pending-and-changed", "not-pending"])
def test_pending_restart(pending, value, needs, clears) -> None:
    rows = {"max_connections": row("max_connections", "100", min_val="1", max_val="262143",
                                   context="postmaster", pending_restart=pending)}
    [change] = plan_settings({"max_connections": value}, rows)
    assert (change.needs, change.clears_pending) == (needs, clears)


@pytest.mark.parametrize("name, value, lowered", [
    ("max_connections", "50", True), ("max_connections", "200", False), ("max_connections", "100", False),
    ("random_page_cost", "1.1", True), ("wal_level", "logical", False),
], ids=["lower", "raise", "same", "real-lower", "not-a-number"])
def test_lowered(name, value, lowered) -> None:
    assert plan_settings({name: value}, ROWS)[0].lowered is lowered


def test_a_setting_that_reads_as_no_number_is_always_a_change() -> None:
    # A show hook may print a number its own way; what cannot be read is never taken as equal.
    rows = {"p": row("p", "auto", unit="kB", min_val="0", max_val="100", context="sighup")}
    [change] = plan_settings({"p": "1kB"}, rows)
    assert (change.needs, change.old, change.new, change.lowered) == ("reload", "auto", "1kB", False)


def test_plan_keeps_the_order_given_and_the_name_pg_settings_spells() -> None:
    changes = plan_settings({"WAL_LEVEL": "logical", "work_mem": "8MB"}, ROWS)
    assert [c.name for c in changes] == ["wal_level", "work_mem"]
    assert needs_restart(changes) and not needs_restart(changes[1:])


def test_plan_refuses_what_validation_refuses() -> None:
    with pytest.raises(SettingsPlanError) as err:
        plan_settings({"work_mem": "8mb", "nope": "1"}, ROWS)
    assert isinstance(err.value, ValueError) and len(err.value.reasons) == 2
    assert "parameters.work_mem" in str(err.value) and "parameters.nope" in str(err.value)


def test_setting_row_from_a_driver_record() -> None:
    r = SettingRow.from_record(("wal_level", "replica", None, "enum", None, None, ["minimal", "replica"],
                                "postmaster", False))
    assert r.enumvals == ("minimal", "replica") and r.pending_restart is False
    assert SettingRow.from_record(("work_mem", "4096", "kB", "integer", "64", "2147483647", None, "user",
                                   True)).enumvals == ()


# --- rolling restart order ------------------------------------------------------------------------

def view(leader: str | None = "pg1", standbys: tuple[str, ...] = ("pg2", "pg3", "pg4"), *, lag=None,
         sync: tuple[str, ...] = (), down: tuple[str, ...] = (), also_primary: tuple[str, ...] = ()) -> ClusterView:
    lag = lag or {}
    members = ([Member(leader, "", "primary", True)] if leader else []) + [
        Member(s, "", "primary" if s in also_primary else "replica", s not in down, lag_bytes=lag.get(s, 0),
               synchronous=s in sync) for s in standbys]
    return ClusterView(initialized=True, members=tuple(members), leader=leader)


ALL = {"pg2": True, "pg3": True, "pg4": True}


@pytest.mark.parametrize("cluster, caught_up, steps", [
    (view(), ALL, [("restart", "pg3"), ("restart", "pg4"), ("restart", "pg2"), ("switchover", "pg2"),
                   ("restart", "pg1")]),
    (view(lag={"pg2": 900, "pg3": 10, "pg4": 0}), ALL,
     [("restart", "pg2"), ("restart", "pg3"), ("restart", "pg4"), ("switchover", "pg4"), ("restart", "pg1")]),
    (view(lag={"pg2": None}), ALL,
     [("restart", "pg2"), ("restart", "pg4"), ("restart", "pg3"), ("switchover", "pg3"), ("restart", "pg1")]),
    (view(), {"pg2": False, "pg3": True, "pg4": False},
     [("restart", "pg2"), ("restart", "pg4"), ("restart", "pg3"), ("switchover", "pg3"), ("restart", "pg1")]),
    (view(sync=("pg4",)), ALL,
     [("restart", "pg2"), ("restart", "pg3"), ("restart", "pg4"), ("switchover", "pg4"), ("restart", "pg1")]),
    (view(sync=("pg3", "pg4"), lag={"pg3": 5, "pg4": 1}), ALL,
     [("restart", "pg2"), ("restart", "pg3"), ("restart", "pg4"), ("switchover", "pg4"), ("restart", "pg1")]),
    (view(standbys=("pg2",)), {"pg2": True}, [("restart", "pg2"), ("switchover", "pg2"), ("restart", "pg1")]),
    (view(), {**ALL, "elsewhere": True},
     [("restart", "pg3"), ("restart", "pg4"), ("restart", "pg2"), ("switchover", "pg2"), ("restart", "pg1")]),
], ids=["even", "most-lag-first", "unknown-lag-first", "lagging-first", "sync-is-target", "best-sync-is-target",
        "two-members", "ignores-unknown-hosts"])
def test_restart_order(cluster, caught_up, steps) -> None:
    order = restart_order(cluster, caught_up)
    assert order == steps and all(isinstance(s, RestartStep) for s in order)


@pytest.mark.parametrize("cluster, caught_up, refused", [
    (view(leader=None), ALL, "has no primary"),
    (view(), {"pg2": True, "pg3": True}, "pg4 does not stream from pg1: it is not restarted"),
    (view(down=("pg3",)), ALL, "counts pg3 unhealthy"),
    (view(also_primary=("pg3",)), ALL, "pg3 reports itself primary beside pg1"),
    (view(), {"pg2": False, "pg3": False, "pg4": False}, "no caught-up standby to switch over to"),
    (view(sync=("pg2",)), {"pg2": False, "pg3": True, "pg4": True}, "no caught-up synchronous standby"),
    (view(standbys=()), {}, "restarting pg1 would leave the cluster without a primary"),
], ids=["no-primary", "not-streaming", "unhealthy", "two-primaries", "none-caught-up", "sync-not-caught-up",
        "primary-alone"])
def test_restart_order_refusals(cluster, caught_up, refused) -> None:
    with pytest.raises(SettingsPlanError) as err:
        restart_order(cluster, caught_up)
    assert isinstance(err.value, ValueError) and refused in str(err.value), str(err.value)


def test_every_standby_that_cannot_be_restarted_is_named() -> None:
    with pytest.raises(SettingsPlanError) as err:
        restart_order(view(down=("pg2",)), {"pg2": True})
    assert len(err.value.reasons) == 3


# --- the plan artifact ----------------------------------------------------------------------------

ORDER = [RestartStep("restart", "pg3"), RestartStep("restart", "pg2"), RestartStep("switchover", "pg2"),
         RestartStep("restart", "pg1")]


def test_nothing_to_do_when_everything_is_set() -> None:
    plan = settings_plan(plan_settings({"work_mem": "4096kB", "wal_level": "Replica"}, ROWS), ORDER)
    assert plan.is_noop and "nothing to change" in plan.noop_summary


def test_reload_only() -> None:
    plan = settings_plan(plan_settings({"work_mem": "8MB", "checkpoint_timeout": "5min",
                                        "log_connections": "on"}, ROWS))
    assert plan.rows() == [{"host": "cluster", "plan": "set work_mem, log_connections in the HA manager's "
                                                       "configuration; every member reloads"}]
    assert plan.remarks() == [
        "work_mem: 4MB → 8MB (reload)",
        "log_connections: off → on (reload)",
        "log_connections: sessions started after the reload get the new value; open sessions keep theirs.",
        "work_mem: a value set for a role, a database or in a session still wins over this one.",
        "Already set: checkpoint_timeout.",
    ]


def test_restart_plan_is_one_action_per_step() -> None:
    plan = settings_plan(plan_settings({"shared_buffers": "1GB", "work_mem": "8MB"}, ROWS), ORDER)
    assert not plan.refusals
    assert [(a.host, a.plan.split(";")[0]) for a in plan.actions] == [
        ("cluster", "set shared_buffers, work_mem in the HA manager's configuration"),
        ("pg3", "restart PostgreSQL through the HA manager (standby)"),
        ("pg2", "restart PostgreSQL through the HA manager (standby)"),
        ("pg2", "switchover from pg1: becomes the primary"),
        ("pg1", "the former primary, restarted by its demotion: restart it through the HA manager only if it "
                "still runs an old value"),
    ]
    assert plan.remarks()[:2] == ["shared_buffers: 128MB → 1GB (restart)", "work_mem: 4MB → 8MB (reload)"]


def test_order_is_ignored_without_a_restart() -> None:
    plan = settings_plan(plan_settings({"work_mem": "8MB"}, ROWS), ORDER)
    assert [a.host for a in plan.actions] == ["cluster"]


def test_a_restart_without_an_order_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="restart_order"):
        settings_plan(plan_settings({"shared_buffers": "1GB"}, ROWS))


@pytest.mark.parametrize("requested, refused", [
    ({"max_connections": "50"}, ("parameters.max_connections: lowering it (100 → 50) needs the primary "
                                 "restarted before its standbys")),
    ({"max_wal_senders": "5", "work_mem": "8MB"}, "parameters.max_wal_senders: lowering it"),
], ids=["max_connections", "max_wal_senders"])
def test_lowering_a_standby_floor_is_refused(requested, refused) -> None:
    plan = settings_plan(plan_settings(requested, ROWS), ORDER)
    assert len(plan.refusals) == 1 and plan.refusals[0].startswith(refused) and not plan.actions


@pytest.mark.parametrize("requested", [{"max_connections": "200"}, {"shared_buffers": "64MB"}],
                         ids=["raising-a-floor", "lowering-another"])
def test_other_restarts_are_planned(requested) -> None:
    plan = settings_plan(plan_settings(requested, ROWS), ORDER)
    assert not plan.refusals and len(plan.actions) == 5


def test_writing_the_running_value_back_is_noted() -> None:
    rows = {"max_connections": row("max_connections", "100", min_val="1", max_val="262143", context="postmaster",
                                   pending_restart=True)}
    plan = settings_plan(plan_settings({"max_connections": "100"}, rows))
    assert [a.host for a in plan.actions] == ["cluster"]
    assert plan.remarks() == ["max_connections: 100 → 100 (reload)",
                              ("max_connections: the configuration held another value waiting for a restart; "
                               "writing 100 back drops it")]


def test_an_empty_string_is_shown_quoted() -> None:
    changes = [SettingChange("search_path", '"$user", public', "", "", "reload", "user")]
    assert settings_plan(changes).remarks()[0] == "search_path: \"$user\", public → '' (reload)"


# --- over every member (change_settings' rerun, reload and verify) ---------------------------------

def member(**changed) -> dict[str, SettingRow]:
    """ROWS as one member runs them: `name=(setting, pending_restart)`."""
    rows = dict(ROWS)
    for name, (setting, pending) in changed.items():
        rows[name] = SettingRow(**{**vars(ROWS[name]), "setting": setting, "pending_restart": pending})
    return rows


@pytest.mark.parametrize(("members", "needs"), [
    # Nobody runs it yet: what the primary needs.
    ({"pg1": member(), "pg2": member()}, ["restart"]),
    # A rerun after the primary and one standby took it: the other standby still needs a restart.
    ({"pg1": member(shared_buffers=("32768", False)), "pg2": member(shared_buffers=("16384", True))}, ["restart"]),
    # The switchover came, the old primary (now pg2) was not restarted yet.
    ({"pg1": member(shared_buffers=("32768", False)), "pg2": member()}, ["restart"]),
    ({"pg1": member(shared_buffers=("32768", False)), "pg2": member(shared_buffers=("32768", False))}, ["nothing"]),
], ids=["none-yet", "standby-pending", "old-primary-behind", "done"])
def test_a_change_needs_what_the_member_furthest_behind_needs(members, needs) -> None:
    changes = plan_cluster_settings({"shared_buffers": "256MB"}, members, "pg1")
    assert [c.needs for c in changes] == needs
    assert changes[0].old == show(members["pg1"]["shared_buffers"])


def test_a_standby_that_has_not_reloaded_makes_a_reload_due() -> None:
    members = {"pg1": member(work_mem=("65536", False)), "pg2": member()}
    assert [c.needs for c in plan_cluster_settings({"work_mem": "64MB"}, members, "pg1")] == ["reload"]


@pytest.mark.parametrize(("rows", "requested", "behind"), [
    (member(), {"shared_buffers": "256MB"}, ["shared_buffers"]),
    (member(shared_buffers=("16384", True)), {"shared_buffers": "256MB"}, ["shared_buffers"]),
    (member(shared_buffers=("32768", False)), {"shared_buffers": "256MB"}, []),
    # Running the new value while the file holds yet another: the restart would bring that in.
    (member(shared_buffers=("32768", True)), {"shared_buffers": "256MB"}, ["shared_buffers"]),
    # A reload brings these: never a reason to restart.
    (member(), {"work_mem": "64MB", "log_rotation_size": "20MB"}, []),
    (member(), {"work_mem": "64MB", "max_connections": "200"}, ["max_connections"]),
], ids=["old", "pending", "done", "done-but-pending-again", "reload-only", "mixed"])
def test_member_needs_restart(rows, requested, behind) -> None:
    assert member_needs_restart(requested, rows) == behind


@pytest.mark.parametrize(("rows", "ha_pending", "behind"), [
    (member(), False, ["work_mem", "shared_buffers"]),
    (member(work_mem=("65536", False)), False, ["shared_buffers"]),
    (member(work_mem=("65536", False), shared_buffers=("16384", True)), False, []),
    # Patroni passes max_connections on the command line: only its own flag says it is pending.
    (member(work_mem=("65536", False)), True, []),
    (member(work_mem=("4096", True)), True, ["work_mem"]),
], ids=["nothing-yet", "reloaded-not-pending", "reloaded", "ha-flag", "reload-still-due"])
def test_not_yet_reloaded(rows, ha_pending, behind) -> None:
    assert not_yet_reloaded({"work_mem": "64MB", "shared_buffers": "256MB"}, rows, ha_pending=ha_pending) == behind


@pytest.mark.parametrize(("requested", "rows", "ha_pending", "behind"), [
    ({"shared_buffers": "256MB"}, member(shared_buffers=("32768", False)), False, []),
    ({"shared_buffers": "256MB"}, member(shared_buffers=("32768", True)), False, ["shared_buffers pending a restart"]),
    ({"shared_buffers": "256MB"}, member(), False, ["shared_buffers is 128MB"]),
    ({"shared_buffers": "256MB"}, member(shared_buffers=("32768", False)), True,
     ["the HA manager reports a restart pending"]),
    # A reload-only change is not held up by a restart someone else left pending.
    ({"work_mem": "64MB"}, member(work_mem=("65536", False)), True, []),
], ids=["done", "pending", "old", "ha-pending", "reload-only-ignores-ha-flag"])
def test_not_yet_in_effect(requested, rows, ha_pending, behind) -> None:
    assert not_yet_in_effect(requested, rows, ha_pending=ha_pending) == behind


MANAGED = {"wal_level": "replica", "max_wal_senders": "10", "shared_preload_libraries": "pg_stat_statements",
           "work_mem": "16MB", "port": None}


@pytest.mark.parametrize(("requested", "inventory", "refused"), [
    ({"statement_timeout": "30s"}, {}, []),
    ({"port": "6543"}, {}, ["parameters.port: set by the HA manager itself on every start; it cannot be changed here"]),
    ({"wal_level": "logical"}, {}, ["parameters.wal_level: bouwsteen sets it to 'replica' for replication, archiving "
                                    "or TLS; set it in cluster.postgres.parameters if it must differ"]),
    # The same value, spelled another way, is no change of ownership.
    ({"WAL_LEVEL": "Replica", "max_wal_senders": "0xa"}, {}, []),
    ({"work_mem": "32MB"}, {"work_mem": "16MB"},
     ["parameters.work_mem: the inventory sets it to '16MB' (cluster.postgres.parameters.work_mem) and build_cluster "
      "would put that back; change the inventory first, then run change_settings with the same value"]),
    # Rolling out what the inventory now says: allowed.
    ({"work_mem": "16384kB"}, {"work_mem": "16MB"}, []),
    ({"shared_preload_libraries": "pg_stat_statements"}, {}, []),
    ({"shared_preload_libraries": "pg_stat_statements,auto_explain"}, {}, [
        "parameters.shared_preload_libraries: bouwsteen sets it to 'pg_stat_statements' for replication, archiving "
        "or TLS; set it in cluster.postgres.parameters if it must differ"]),
], ids=["free", "ha-owned", "bouwsteen-owned", "same-value-other-spelling", "inventory-pinned", "inventory-value",
        "string-same", "string-differs"])
def test_ownership_refusals(requested, inventory, refused) -> None:
    rows = {**ROWS, "port": row("port", "5432", min_val="1", max_val="65535", context="postmaster")}
    assert ownership_refusals(requested, rows, MANAGED, inventory) == refused
