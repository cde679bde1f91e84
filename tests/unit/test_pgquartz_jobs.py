"""PgQuartz job files: loading, validation and planning (tasks.pgquartz); pure, no database."""

from __future__ import annotations

import copy
import logging
import os
import re
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Self

import pytest
import yaml

from tasks import tab
from tasks.pgquartz import (
    ROLE_QUERY,
    Check,
    InstanceResult,
    Job,
    JobFileError,
    PlanError,
    StepResult,
    WhenExpressionError,
    check_passed,
    command_output,
    effective_role,
    etcd_endpoint_address,
    evaluate_when,
    executable_by_me,
    expand_matrix,
    find_cycle,
    format_sql_rows,
    instance_env,
    is_loopback_endpoint,
    load_job,
    load_jobs,
    output_lines,
    parse_go_duration,
    parse_job,
    read_script,
    render_result,
    render_sql,
    role_problem,
    run_commands,
    run_waves,
    split_batch,
    step_should_run,
    step_waves,
    when_step_refs,
)
from tasks.planning.job_role import JobRole

SAMPLE_JOB = Path(__file__).resolve().parents[2] / "deployments" / "jobs" / "purge_audit_log.yml"

# The shape sample from the reference, as data: every bad-input case below is one mutation of it.
BASE: dict[str, Any] = {
    "parallel": 1,
    "timeout": "30m",
    "etcdConfig": {"endpoints": ["localhost:2379"], "lockKey": "vacuum", "lockTimeout": "10m"},
    "connections": {"pg": {"type": "postgresql", "role": "primary",
                           "conn_params": {"host": "/tmp", "port": 5432, "dbname": "postgres"}}},
    "steps": {
        "analyze": {"commands": [{"name": "analyze", "type": "pg", "inline": "analyze"}]},
        "report": {
            "depends": ["analyze"],
            "when": ["eq .Steps.analyze.Rc 0"],
            "matrix": {"tbl": ["t1", "t2"]},
            "commands": [{"name": "count", "type": "pg",
                          "inline": "select count(*) from pg_class where relname = :tbl"}],
        },
    },
    "checks": [{"name": "table there", "type": "pg",
                "inline": "select 1 from pg_tables where tablename = 't1'", "expected": "1"}],
}


def write_job(tmp_path: Path, data: Any, name: str = "job.yml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def mutate(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    fn(data)
    return data


def make_job(tmp_path: Path, **top: Any) -> Job:
    data = copy.deepcopy(BASE)
    data.update(top)
    return load_job(write_job(tmp_path, data))


def results(**steps: Any) -> dict[str, StepResult]:
    """step name -> (rc, stdout[, stderr]) or a list of such tuples, one per instance."""
    out = {}
    for name, spec in steps.items():
        specs = spec if isinstance(spec, list) else [spec]
        out[name] = StepResult([InstanceResult({}, *s) for s in specs])
    return out


# --------------------------------------------------------------------------- durations

@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800), ("1h30m", 5400), ("10s", 10), ("100h", 360000), ("1.5h", 5400), ("300ms", 0.3),
    ("2us", 2e-6), ("2µs", 2e-6), ("1h0m30s", 3630), (".5s", 0.5), ("1.s", 1), ("0", 0), ("-1m", -60),
    ("+5s", 5), ("1000ns", 1e-6),
])
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, fragment", [
    ("", "invalid duration"), ("10", "missing unit"), ("1d", "unknown unit 'd'"), ("1h 30m", "unknown unit"),
    (".", "invalid duration"), ("-", "invalid duration"), ("m", "invalid duration"), ("30 minutes", "unknown unit"),
])
def test_parse_go_duration_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_go_duration(text)


# --------------------------------------------------------------------------- model defaults and scalars

def test_defaults_follow_pgquartz(tmp_path: Path) -> None:
    data = {"parallel": 2, "steps": {"only": {"commands": [{"type": "shell", "inline": "true"}]}},
            "target": {"distribution": "parallel"}, "alerts": [{"type": "shell", "command": "x"}],
            "log": [{"type": "file", "path": "/x"}]}
    job = load_job(write_job(tmp_path, data, "nightly.vacuum.yaml"))
    assert job.name == "nightly.vacuum"  # basename minus the last extension
    assert job.etcd_config.lock_key == "nightly.vacuum"
    assert job.lock_prefix == "/pgquartz/nightly.vacuum/"
    assert job.etcd_config.endpoints is None and job.etcd_config.endpoints_given is False
    assert job.etcd_config.effective_endpoints == ["localhost:2379"]  # pgquartz's default
    assert job.etcd_config.lock_timeout == 100 * 3600
    assert job.timeout is None and job.debug is False and job.run_on_role_error is False
    assert job.git.remote == "origin" and job.git.revision == "main"
    assert job.workdir_path == tmp_path.resolve()
    assert job.checks == [] and job.connections == {}


def test_yaml_scalars_are_read_like_yaml_v2(tmp_path: Path) -> None:
    text = """
parallel: 0x2
debug: yes
runOnRoleError: off
timeout: 1h
connections:
  pg: {role: all, conn_params: {port: 5432, sslmode: on}}
steps:
  s:
    matrix: {v: [010, 1.50, 2024-01-01, true, ~x]}
    commands: [{type: pg, inline: "select :v", batchMode: True}]
checks:
  - {type: shell, inline: "exit 3", rc: "3"}
"""
    job = load_job(write_job(tmp_path, text))
    assert job.parallel == 2 and job.debug is True and job.run_on_role_error is False
    assert job.connections["pg"].conn_params == {"port": "5432", "sslmode": "on"}
    assert job.steps["s"].matrix == {"v": ["010", "1.50", "2024-01-01", "true", "~x"]}
    assert job.steps["s"].commands[0].batch_mode is True
    assert job.checks[0].rc == 3


def test_null_values_mean_default(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, "parallel: 1\nchecks:\netcdConfig:\n  lockKey:\n"
                                       "steps:\n  a:\n    depends:\n    commands: [{type: shell, inline: x}]\n"))
    assert job.checks == [] and job.steps["a"].depends == [] and job.etcd_config.lock_key == "job"


def test_workdir_relative_to_job_file_and_scripts(tmp_path: Path) -> None:
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "count.sql").write_text("select count(*) from ${tbl} where x = :tbl\n")
    data = mutate(lambda d: d["steps"]["report"]["commands"][0].update(inline=None, file="count.sql"))
    data["steps"]["report"]["commands"][0].pop("inline")
    data["workdir"] = "sql"
    job = load_job(write_job(tmp_path, data))
    cmd = job.steps["report"].commands[0]
    assert job.workdir_path == tmp_path.resolve() / "sql"
    assert read_script(job, cmd).startswith("select count(*) from ${tbl}")


def test_symlinked_job_takes_the_target_name(tmp_path: Path) -> None:
    target = write_job(tmp_path, BASE, "vacuum.yml")
    (tmp_path / "config.yaml").symlink_to(target)
    job = load_job(tmp_path / "config.yaml")
    assert job.name == "vacuum" and job.source == target.resolve()


def test_connection_repr_hides_password() -> None:
    job = Job.model_validate(mutate(lambda d: d["connections"]["pg"]["conn_params"].update(password="s3cret")))
    assert "s3cret" not in repr(job)
    assert job.connections["pg"].conn_params["password"] == "s3cret"


# --------------------------------------------------------------------------- the sample job

def test_sample_job_loads_and_plans() -> None:
    job = load_job(SAMPLE_JOB)
    assert job.name == "purge_audit_log"
    assert job.parallel == 1 and job.timeout == 1800
    assert job.lock_prefix == "/pgquartz/purge_audit_log/" and job.etcd_config.lock_timeout == 600
    assert {c.role for c in job.connections.values()} == {"primary"}
    assert step_waves(job) == [["ensure_table"], ["find_expired"], ["purge"], ["analyze"]]
    assert len(expand_matrix(job.steps["purge"].matrix)) == 3
    assert any(c.expected for c in job.checks) and any(c.unexpected for c in job.checks)
    assert all(rule for s in job.steps.values() for rule in s.when)
    purge = job.steps["purge"].commands[0]
    query, params = render_sql(purge.inline, {"category": "auth", "keep_days": "90"})
    assert params == {"category": "auth", "keep_days": "90"}
    assert "%(keep_days)s::int" in query and "%(category)s::text" in query
    assert len(split_batch(job.steps["ensure_table"].commands[0].inline)) == 2
    assert effective_role(job, purge) == "primary"
    assert effective_role(job, job.steps["analyze"].commands[1]) is None


def test_sample_job_when_rules_follow_the_probe() -> None:
    job = load_job(SAMPLE_JOB)
    found = results(ensure_table=(0, ""), find_expired=(0, "{verdict}={expired_rows_present}"))
    nothing = results(ensure_table=(0, ""), find_expired=(0, ""))
    assert step_should_run(job.steps["purge"], found)
    assert not step_should_run(job.steps["purge"], nothing)
    assert step_should_run(job.steps["ensure_table"], {})


def test_load_jobs_directory(tmp_path: Path) -> None:
    write_job(tmp_path, BASE, "a.yml")
    write_job(tmp_path, BASE, "b.yaml")
    (tmp_path / "README.md").write_text("not a job")
    assert sorted(load_jobs(tmp_path)) == ["a", "b"]
    assert "purge_audit_log" in load_jobs(SAMPLE_JOB.parent)


def test_load_jobs_reports_every_bad_file_and_name_clashes(tmp_path: Path) -> None:
    write_job(tmp_path, BASE, "a.yml")
    write_job(tmp_path, BASE, "a.yaml")
    write_job(tmp_path, mutate(lambda d: d.update(parallel=0)), "b.yml")
    write_job(tmp_path, mutate(lambda d: d.pop("steps")), "c.yml")
    with pytest.raises(JobFileError) as err:
        load_jobs(tmp_path)
    text = str(err.value)
    assert "a.yml: <root>: job name 'a' is already used by a.yaml" in text
    assert "b.yml: parallel:" in text and "c.yml: steps: missing" in text
    assert len(err.value.problems) == 3


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    def broken(d: dict[str, Any]) -> None:
        d["steps"]["report"]["depends"] = ["nope"]
        d["steps"]["analyze"]["commands"][0]["type"] = "pgx"
    with pytest.raises(JobFileError) as err:
        load_job(write_job(tmp_path, mutate(broken)))
    keys = [p.key for p in err.value.problems]
    assert "steps.report.depends[0]" in keys and "steps.analyze.commands[0].type" in keys
    assert "steps.report.when[0]" in keys  # analyze is no longer a dependency


# --------------------------------------------------------------------------- bad-input corpus

def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return apply


_DELETE = object()
ANALYZE_CMD = "steps/analyze/commands/0"
REPORT = "steps/report"

BAD_JOBS: list[tuple[str, Any, str, str]] = [
    # (id, mutation or raw YAML text, key path in the message, reason fragment)
    ("parallel 0", _set("parallel", 0), "parallel", "parallel: 0 runs nothing in pgquartz; set parallel ≥ 1"),
    ("parallel missing", _set("parallel", _DELETE), "parallel", "runs nothing in pgquartz; set parallel ≥ 1"),
    ("parallel negative", _set("parallel", -1), "parallel", "must be ≥ 1"),
    ("parallel text", _set("parallel", "two"), "parallel", "must be an integer"),
    ("no steps", _set("steps", {}), "steps", "at least one step"),
    ("steps missing", _set("steps", _DELETE), "steps", "missing"),
    ("step without commands", _set(f"{REPORT}/commands", []), "steps.report.commands", "at least 1 item"),
    ("missing depends target", _set(f"{REPORT}/depends", ["analyze", "anlyze"]), "steps.report.depends[1]",
     "unknown step 'anlyze'"),
    ("cycle", _set("steps/analyze/depends", ["report"]), "steps.analyze.depends",
     "dependency cycle: analyze → report → analyze"),
    ("self dependency", _set("steps/analyze/depends", ["analyze"]), "steps.analyze.depends",
     "dependency cycle: analyze → analyze"),
    ("unknown connection type", _set(f"{ANALYZE_CMD}/type", "postgres"), "steps.analyze.commands[0].type",
     "unknown connection 'postgres'"),
    ("unknown check type", _set("checks/0/type", "query"), "checks[0].type", "unknown connection 'query'"),
    ("empty type with connections", _set(f"{ANALYZE_CMD}/type", ""), "steps.analyze.commands[0].type",
     "type is empty"),
    ("both inline and file", _set(f"{ANALYZE_CMD}/file", "a.sql"), "steps.analyze.commands[0]",
     "exactly one of inline or file"),
    ("neither inline nor file", _set(f"{ANALYZE_CMD}/inline", _DELETE), "steps.analyze.commands[0]",
     "exactly one of inline or file"),
    ("missing script file", lambda d: (d["steps"]["analyze"]["commands"][0].pop("inline"),
                                       d["steps"]["analyze"]["commands"][0].update(file="sql/analyze.sql")),
     "steps.analyze.commands[0].file", "script 'sql/analyze.sql' not found"),
    ("bad timeout", _set("timeout", "30 minutes"), "timeout", "unknown unit"),
    ("timeout without unit", _set("timeout", 30), "timeout", "missing unit"),
    ("zero timeout", _set("timeout", "0s"), "timeout", "must be positive"),
    ("bad lockTimeout", _set("etcdConfig/lockTimeout", "1d"), "etcdConfig.lockTimeout", "unknown unit 'd'"),
    ("unknown top-level key", lambda d: d.update(etcd_config=d.pop("etcdConfig")), "etcd_config",
     "unknown key 'etcd_config' (did you mean 'etcdConfig'?)"),
    ("general_config from the docs", _set("general_config", {"parallel": 1}), "general_config",
     "pgquartz has no such section"),
    ("unknown step key", lambda d: d["steps"]["report"].update(depend=d["steps"]["report"].pop("depends")),
     "steps.report.depend", "did you mean 'depends'?"),
    ("unknown command key", _set(f"{ANALYZE_CMD}/batch_mode", True), "steps.analyze.commands[0].batch_mode",
     "did you mean 'batchMode'?"),
    ("unknown connection key", _set("connections/pg/connParams", {}), "connections.pg.connParams",
     "did you mean 'conn_params'?"),
    ("unknown etcd key", _set("etcdConfig/lock_key", "x"), "etcdConfig.lock_key", "did you mean 'lockKey'?"),
    ("bad role", _set("connections/pg/role", "master"), "connections.pg.role", "primary, standby or all"),
    ("missing role", _set("connections/pg/role", _DELETE), "connections.pg.role", "set role to primary"),
    ("bad command role", _set(f"{ANALYZE_CMD}/role", "replica"), "steps.analyze.commands[0].role",
     "primary, standby or all"),
    ("role on shell", lambda d: d["steps"]["analyze"]["commands"][0].update(type="shell", role="primary"),
     "steps.analyze.commands[0].role", "SQL commands only"),
    ("check rc not int", _set("checks/0/rc", "one"), "checks[0].rc", "must be an integer"),
    ("check rc float", _set("checks/0/rc", 1.5), "checks[0].rc", "must be an integer"),
    ("shell rc out of range", lambda d: d["checks"][0].update(type="shell", rc=256), "checks[0].rc", "0..255"),
    ("multiline expected", _set("checks/0/expected", "a\nb"), "checks[0].expected", "single line"),
    ("when not in depends", _set(f"{REPORT}/depends", []), "steps.report.when[0]", "issue #42"),
    ("when unknown step", _set(f"{REPORT}/when", ["eq .Steps.nope.Rc 0"]), "steps.report.when[0]",
     "unknown step 'nope'"),
    ("when unknown function", _set(f"{REPORT}/when", ['contains .Steps.analyze.StdOut "x"']),
     "steps.report.when[0]", "unknown function 'contains'"),
    ("when type error", _set(f"{REPORT}/when", ['eq .Steps.analyze.Rc "0"']), "steps.report.when[0]",
     "incompatible types"),
    ("when bad regexp", _set(f"{REPORT}/when", ['.Steps.analyze.StdOut.RegExpContains "(x"']),
     "steps.report.when[0]", "invalid regular expression"),
    ("when not a list", _set(f"{REPORT}/when", "eq .Steps.analyze.Rc 0"), "steps.report.when",
     "valid list"),
    ("matrix without values", _set(f"{REPORT}/matrix", {"tbl": []}), "steps.report.matrix", "has no values"),
    ("matrix bad name", _set(f"{REPORT}/matrix", {"my-tbl": ["a"]}), "steps.report.matrix", "'my-tbl'"),
    ("unknown text arg", _set(f"{REPORT}/commands/0/inline", "select * from ${table}"),
     "steps.report.commands[0].inline", "${table}"),
    ("statements without batchMode", _set(f"{ANALYZE_CMD}/inline", "analyze; vacuum"),
     "steps.analyze.commands[0].inline", "set batchMode: true"),
    ("lockKey with slash", _set("etcdConfig/lockKey", "jobs/vacuum"), "etcdConfig.lockKey", "must not contain '/'"),
    ("connection named shell", lambda d: d["connections"].update(shell=d["connections"]["pg"]),
     "connections.shell", "may not be named 'shell'"),
    ("step name with space", lambda d: d["steps"].update({"step 1": {"commands": "x"}}),
     "steps['step 1'].commands", "valid list"),
    ("duplicate key", "parallel: 1\nparallel: 2\nsteps: {a: {commands: [{type: shell, inline: x}]}}\n",
     "parallel", "duplicate key at line 2 (first at line 1)"),
    ("empty file", "", "<root>", "got an empty file"),
    ("not a mapping", "- parallel: 1\n", "<root>", "must be a YAML mapping, got a list"),
    ("invalid yaml", "steps: [\n", "<root>", "invalid YAML at line 2"),
]


@pytest.mark.parametrize("mutation, key, reason", [c[1:] for c in BAD_JOBS], ids=[c[0] for c in BAD_JOBS])
def test_bad_job_names_file_key_and_reason(tmp_path: Path, mutation: Any, key: str, reason: str) -> None:
    path = write_job(tmp_path, mutation if isinstance(mutation, str) else mutate(mutation), "bad.yml")
    with pytest.raises(JobFileError) as err:
        load_job(path)
    assert any(p.key == key and reason in p.reason for p in err.value.problems), str(err.value)
    line = next(line for line in str(err.value).splitlines() if reason in line)
    assert line.startswith(f"{path}: {key}: ")


def test_base_job_is_valid(tmp_path: Path) -> None:
    # Guards the corpus above: each case fails for its own reason, not for the base's.
    job = load_job(write_job(tmp_path, BASE))
    assert job.etcd_config.lock_key == "vacuum" and job.connections["pg"].conn_params["port"] == "5432"


def test_unreadable_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match=r"missing\.yml: <root>: cannot read job file"):
        load_job(tmp_path / "missing.yml")


def test_existing_script_file_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "analyze.sql").write_text("analyze;\n")
    data = mutate(lambda d: d["steps"]["analyze"]["commands"][0].pop("inline"))
    data["steps"]["analyze"]["commands"][0]["file"] = "analyze.sql"
    job = load_job(write_job(tmp_path, data))
    assert read_script(job, job.steps["analyze"].commands[0]) == "analyze;\n"


def test_dollar_quoted_body_is_one_statement(tmp_path: Path) -> None:
    fn = "create function f() returns int language plpgsql as $$ begin perform 1; return 1; end $$;"
    load_job(write_job(tmp_path, mutate(_set(f"{ANALYZE_CMD}/inline", fn))))


def test_untyped_shell_is_fine_without_connections(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, {"parallel": 1, "steps": {"a": {"commands": [{"inline": "true"}]}}}))
    assert job.steps["a"].commands[0].is_shell


# --------------------------------------------------------------------------- matrix

@pytest.mark.parametrize("matrix, expected", [
    ({}, [{}]),
    ({"tbl": ["t1"]}, [{"tbl": "t1"}]),
    ({"tbl": ["t1", "t2"]}, [{"tbl": "t1"}, {"tbl": "t2"}]),
    ({"x": ["1", "2"], "y": ["a", "b"]},
     [{"x": "1", "y": "a"}, {"x": "1", "y": "b"}, {"x": "2", "y": "a"}, {"x": "2", "y": "b"}]),
    ({"y": ["b", "a"], "x": ["1"]}, [{"y": "b", "x": "1"}, {"y": "a", "x": "1"}]),
    ({"x": ["1", "1", "2"]}, [{"x": "1"}, {"x": "2"}]),
    ({"x": ["1"], "y": []}, []),
])
def test_expand_matrix(matrix: dict[str, list[str]], expected: list[dict[str, str]]) -> None:
    assert expand_matrix(matrix) == expected


def test_expand_matrix_size_is_the_product() -> None:
    assert len(expand_matrix({"a": list("123"), "b": list("45"), "c": list("6789")})) == 24


@pytest.mark.parametrize("instance, env", [
    ({}, {}),
    ({"tbl": "t1"}, {"PGQ_INSTANCE_TBL": "t1"}),
    ({"keep_days": "90", "Db": "app"}, {"PGQ_INSTANCE_KEEP_DAYS": "90", "PGQ_INSTANCE_DB": "app"}),
])
def test_instance_env(instance: dict[str, str], env: dict[str, str]) -> None:
    assert instance_env(instance) == env


# --------------------------------------------------------------------------- waves and cycles

def _steps(deps: dict[str, list[str]]) -> dict[str, Any]:
    return {name: {"depends": d, "commands": [{"type": "shell", "inline": "true"}]} for name, d in deps.items()}


@pytest.mark.parametrize("deps, waves", [
    ({"a": []}, [["a"]]),
    ({"a": [], "b": ["a"], "c": ["b"]}, [["a"], ["b"], ["c"]]),
    ({"c": ["b"], "b": ["a"], "a": []}, [["a"], ["b"], ["c"]]),
    ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, [["a"], ["b", "c"], ["d"]]),
    ({"z": [], "a": [], "m": ["z"]}, [["z", "a"], ["m"]]),
    ({"a": [], "b": ["a"], "c": ["a", "b"]}, [["a"], ["b"], ["c"]]),
    ({"a": [], "b": ["a", "a"]}, [["a"], ["b"]]),
])
def test_step_waves(deps: dict[str, list[str]], waves: list[list[str]]) -> None:
    job = Job.model_validate({"parallel": 1, "steps": _steps(deps)})
    assert step_waves(job) == waves


@pytest.mark.parametrize("deps, message", [
    ({"a": ["a"]}, "dependency cycle: a → a"),
    ({"a": ["b"], "b": ["a"]}, "dependency cycle: a → b → a"),
    ({"x": [], "a": ["c"], "b": ["a"], "c": ["b"]}, "dependency cycle: a → c → b → a"),
    ({"a": ["ghost"]}, "unknown step 'ghost'"),
])
def test_step_waves_rejects(deps: dict[str, list[str]], message: str) -> None:
    job = Job.model_validate({"parallel": 1, "steps": _steps(deps)})
    with pytest.raises(PlanError, match=message):
        step_waves(job)


def test_find_cycle_none_for_a_dag() -> None:
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


# --------------------------------------------------------------------------- when rules

RESULTS = {
    **results(
        analyze=(0, "done\n"),
        report=[(0, "{count}={3}\n"), (2, "", "ERROR: boom\n")],
        dump=(0, "pg_dump: dumping contents\nwritten 42 MB\n", "warning: x\n"),
    ),
    "skipped-step": StepResult(),
}


@pytest.mark.parametrize("rule, expected", [
    ("eq .Steps.analyze.Rc 0", True),
    ("eq .Steps.report.Rc 0", False),
    ("eq .Steps.report.Rc 2", True),  # the sum over instances
    ("eq .Steps.report.Instances.Rc 2", True),
    ("ne .Steps.report.Rc 0", True),
    ("lt .Steps.analyze.Rc 1", True),
    ("gt .Steps.report.Rc 1", True),
    ("le .Steps.report.Rc 1", False),
    ("ge .Steps.report.Rc 2", True),
    ("eq .Steps.report.Rc 0 1 2", True),  # Go's eq: equal to any of the others
    ("not (eq .Steps.analyze.Rc 0)", False),
    ("and (eq .Steps.analyze.Rc 0) (eq .Steps.report.Rc 0)", False),
    ("or (eq .Steps.analyze.Rc 0) (eq .Steps.report.Rc 0)", True),
    ("and (eq .Steps.analyze.Rc 0) (or (eq .Steps.report.Rc 2) false)", True),
    ('.Steps.report.Instances.StdOut.Contains "{count}={3}"', True),
    ('.Steps.report.Instances.StdOut.Contains "{count}={4}"', False),
    ('.Steps.report.Instances.StdErr.Contains "boom"', True),
    ('.Steps.report.StdErr.Contains "boom"', True),
    ('.Steps.dump.Instances.StdOut.ContainsLine "written 42 MB"', True),
    ('.Steps.dump.Instances.StdOut.ContainsLine "written 42"', False),
    ('.Steps.dump.Instances.StdOut.RegExpContains "^written [0-9]+ MB$"', True),
    ('.Steps.dump.Instances.StdErr.RegExpContains "^error"', False),
    ('.Steps.dump.Instances.StdOut.Contains `42 MB`', True),
    ('.Steps.dump.Instances.StdOut.Contains "\\x34\\x32"', True),
    ("eq (index .Steps \"skipped-step\").Rc 0", True),
    ("gt (len .Steps.report.Instances.StdOut) 1", True),
    (".Steps.analyze.Rc | eq 0", True),
    ('"done" | .Steps.analyze.StdOut.ContainsLine', True),
    (".Steps.report.Rc", True),  # non-zero int is truthy
    (".Steps.analyze.Rc", False),
    ("true", True),
    ("false", False),
    ("eq 0x2 .Steps.report.Rc", True),
    ("{{if eq .Steps.analyze.Rc 0}}True{{end}}", True),
    ("{{- if eq .Steps.report.Rc 0 }}True{{ else }}False{{ end -}}", False),
    ("{{if eq .Steps.report.Rc 0}}no{{else if eq .Steps.report.Rc 2}}True{{end}}", True),
    ("{{ eq .Steps.analyze.Rc 0 }}", False),  # renders "true": pgquartz wants exactly "True"
    ("{{/* a comment */}}True", True),
])
def test_evaluate_when(rule: str, expected: bool) -> None:
    assert evaluate_when(rule, RESULTS) is expected


@pytest.mark.parametrize("rule, fragment", [
    ('contains .Steps.analyze.StdOut "x"', "unknown function 'contains'"),
    ("printf \"%d\" .Steps.analyze.Rc", "unknown function 'printf'"),
    ("eq .Steps.ghost.Rc 0", "unknown step 'ghost'"),
    ("eq (index .Steps \"ghost\").Rc 0", "unknown step 'ghost'"),
    ("eq .Steps.analyze.Rcc 0", "unknown field .Rcc"),
    ("eq .Config.Parallel 1", "rules can only read .Steps"),
    ('eq .Steps.analyze.Rc "0"', "incompatible types"),
    ("lt .Steps.analyze.StdOut 1", "invalid type for comparison"),
    ("eq .Steps.analyze.Rc", "missing argument"),
    ("ne .Steps.analyze.Rc 0 1", "wrong number of args"),
    (".Steps.analyze.StdOut.Contains", "wrong number of args"),
    (".Steps.analyze.StdOut.Contains 1", "expected string"),
    ('.Steps.analyze.StdOut.RegExpContains "[a-"', "invalid regular expression"),
    ("eq .Steps.analyze.Rc 0.5", "only integer constants"),
    ("eq $rc 0", "variables are not supported"),
    ("and (eq .Steps.analyze.Rc 0", "unclosed '('"),
    ('.Steps.analyze.StdOut.Contains "x', "unterminated string"),
    ("", "empty rule"),
    ("{{if true}}True", "missing {{end}}"),
    ("{{range .Steps}}x{{end}}", "not supported"),
    ("{{ end }}", "unexpected {{end}}"),
    ("1 2", "can't give argument to non-function"),
])
def test_evaluate_when_errors(rule: str, fragment: str) -> None:
    with pytest.raises(WhenExpressionError, match=re.escape(fragment)):
        evaluate_when(rule, RESULTS)


@pytest.mark.parametrize("rule, refs", [
    ("eq .Steps.a.Rc 0", {"a"}),
    ('and (eq .Steps.a.Rc 0) (.Steps.b.Instances.StdOut.Contains "x")', {"a", "b"}),
    ('eq (index .Steps "step-1").Rc 0', {"step-1"}),
    ("{{if eq .Steps.a.Rc 0}}True{{else if eq .Steps.c.Rc 0}}True{{end}}", {"a", "c"}),
    ("true", set()),
])
def test_when_step_refs(rule: str, refs: set[str]) -> None:
    assert when_step_refs(rule) == refs


def test_when_step_refs_checks_every_branch() -> None:
    # `or` short-circuits at run time, but a type error behind it is still a broken rule.
    assert evaluate_when('or true (eq .Steps.a.Rc "x")', results(a=(0, ""))) is True
    with pytest.raises(WhenExpressionError, match="incompatible types"):
        when_step_refs('or true (eq .Steps.a.Rc "x")')


def test_and_or_short_circuit_like_go() -> None:
    assert evaluate_when("or (eq .Steps.analyze.Rc 0) (eq .Steps.ghost.Rc 0)", RESULTS) is True
    assert evaluate_when("and (eq .Steps.analyze.Rc 1) (eq .Steps.ghost.Rc 0)", RESULTS) is False


def test_step_result_rc_and_lines() -> None:
    r = StepResult([InstanceResult({"x": "1"}, 1, "a\nb\n"), InstanceResult({"x": "2"}, 3, "c")])
    assert r.rc == 4 and r.stdout_lines == ("a", "b", "c")
    assert StepResult().rc == 0
    assert output_lines("x\n") == ("x",) and output_lines("") == ("",)


# --------------------------------------------------------------------------- SQL rendering

TBL = {"tbl": "t1", "days": "90", "pct": "5%"}


@pytest.mark.parametrize("sql, query, params", [
    ("select * from pg_class where relname = :tbl", "select * from pg_class where relname = %(tbl)s", {"tbl": "t1"}),
    ("select :days::int", "select %(days)s::int", {"days": "90"}),
    ("select x::tbl from y", "select x::tbl from y", {}),  # a cast to a type named like an arg
    ("select ':tbl', \":tbl\"", "select ':tbl', \":tbl\"", {}),
    ("select 'it''s :tbl', :tbl", "select 'it''s :tbl', %(tbl)s", {"tbl": "t1"}),
    ("select E'\\' :tbl', :days", "select E'\\' :tbl', %(days)s", {"days": "90"}),
    ("select $$ :tbl $$, $f$ ' :tbl $f$, :tbl", "select $$ :tbl $$, $f$ ' :tbl $f$, %(tbl)s", {"tbl": "t1"}),
    ("do $$ begin x := :tbl; end $$", "do $$ begin x := :tbl; end $$", {}),
    ("select a := 1", "select a := 1", {}),
    ("select 1 -- :tbl\n, :tbl /* :tbl /* :x */ :tbl */", "select 1 -- :tbl\n, %(tbl)s /* :tbl /* :x */ :tbl */",
     {"tbl": "t1"}),
    ("select :tbl_name, :tbls, :tbl", "select :tbl_name, :tbls, %(tbl)s", {"tbl": "t1"}),
    ("select :other", "select :other", {}),
    ("select 7 % 2, '10%'", "select 7 %% 2, '10%%'", {}),
    ("select * from ${tbl} where r = ':${tbl}'", "select * from t1 where r = ':t1'", {}),
    ("select ${pct}, '${pct}'", "select 5%%, '5%%'", {}),
    ("select ${nope}", "select ${nope}", {}),
    ("select $1, a$b", "select $1, a$b", {}),
    ("select :tbl = :tbl", "select %(tbl)s = %(tbl)s", {"tbl": "t1"}),
    ("select arr[1:2]", "select arr[1:2]", {}),
    ("select 'unterminated :tbl", "select 'unterminated :tbl", {}),
])
def test_render_sql(sql: str, query: str, params: dict[str, str]) -> None:
    assert render_sql(sql, TBL) == (query, params)


@pytest.mark.parametrize("sql, statements", [
    ("select 1", ["select 1"]),
    ("select 1;", ["select 1"]),
    ("select 1; select 2;\n", ["select 1", "select 2"]),
    ("insert into t values ('a;b'); select \";\"", ["insert into t values ('a;b')", "select \";\""]),
    ("create function f() returns int as $$ select 1; $$ language sql; select f()",
     ["create function f() returns int as $$ select 1; $$ language sql", "select f()"]),
    ("select 1; -- done;\n", ["select 1"]),
    ("-- header\nselect 1; /* ; */ ;", ["-- header\nselect 1"]),
    ("", []),
    (" ; ;", []),
])
def test_split_batch(sql: str, statements: list[str]) -> None:
    assert split_batch(sql) == statements


def test_format_sql_rows_like_pgquartz() -> None:
    rows = format_sql_rows(["n", "s", "b", "z"], [(1, "it's", True, None)])
    assert rows == ["{n}={1}, {s}={it''s}, {b}={true}, {z}={<nil>}"]
    assert format_sql_rows(["x"], []) == []


# --------------------------------------------------------------------------- checks

def _check(**fields: Any) -> Check:
    return Check.model_validate({"inline": "x", **fields})


@pytest.mark.parametrize("fields, rc, output, passed, reason", [
    ({"type": "shell"}, 0, "", True, "ok"),
    ({"type": "shell"}, 1, "", False, "exit code 1, expected 0"),
    ({"type": "shell", "rc": 1}, 1, "", True, "ok"),
    ({"type": "shell", "rc": 1}, 0, "", False, "exit code 0, expected 1"),  # pgquartz misses this
    ({"type": "shell", "rc": 2}, 1, "", False, "exit code 1, expected 2"),
    ({"type": "pg"}, 0, "{n}={1}", True, "ok"),
    ({"type": "pg"}, 1, "", False, "query failed but was expected to succeed"),
    ({"type": "pg", "rc": 1}, 1, "", True, "ok"),
    ({"type": "pg", "rc": 3}, 1, "", True, "ok"),  # SQL: any non-zero rc means "must fail"
    ({"type": "pg", "rc": 1}, 0, "", False, "query succeeded but was expected to fail"),
    ({"type": "pg", "expected": "purge_complete"}, 0, "{verdict}={purge_complete}", True, "ok"),
    ({"type": "pg", "expected": "purge_complete"}, 0, "{verdict}={purge_incomplete}", False, "not found"),
    ({"type": "pg", "expected": "1"}, 0, "", False, "expected text '1' not found"),
    ({"type": "pg", "unexpected": "MISSING"}, 0, "{idx}={MISSING}", False, "unexpected text 'MISSING' found"),
    ({"type": "pg", "unexpected": "MISSING"}, 0, "{idx}={audit_idx}", True, "ok"),
    ({"type": "pg", "expected": "ok", "unexpected": "bad"}, 0, ["ok", "bad"], False, "unexpected text"),
    ({"type": "pg", "expected": "b"}, 0, ["a", "b"], True, "ok"),
    # Only stdout given: stderr is empty, and pgquartz wants `expected` in both (see below).
    ({"type": "shell", "rc": 1, "expected": "denied"}, 1, "permission denied", False,
     "expected text 'denied' not found in stderr [ '' ]"),
    ({"type": "pg", "rc": 1, "expected": "x"}, 0, "x", False, "expected to fail"),  # rc is judged first
])
def test_check_passed(fields: dict[str, Any], rc: int, output: Any, passed: bool, reason: str) -> None:
    ok, why = check_passed(_check(**fields), rc, output)
    assert ok is passed and reason in why


def test_effective_role_prefers_the_command(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    cmd = job.steps["analyze"].commands[0]
    assert effective_role(job, cmd) == "primary"
    assert effective_role(job, cmd.model_copy(update={"role": "standby"})) == "standby"


# --------------------------------------------------------------------------- the wave loop


def wave_job(parallel: int = 1, when: str = "eq .Steps.analyze.Rc 0") -> Job:
    data = copy.deepcopy(BASE)
    data["parallel"] = parallel
    data["steps"]["report"]["when"] = [when]
    data["steps"]["report"]["matrix"] = {"tbl": ["t1", "t2", "t3"]}
    return parse_job(data, source=Path("/jobs/waves.yml"))


def recording_runner(rc_of: dict[str, int]):
    """A step runner that records its batches and answers with the given return code per step."""
    batches: list[tuple[str, str, list]] = []

    def run_batch(node: str, step: str, instances: list) -> list[InstanceResult]:
        batches.append((node, step, [dict(i) for i in instances]))
        return [InstanceResult(i, rc_of.get(step, 0), "", "") for i in instances]

    return run_batch, batches


@pytest.mark.parametrize("analyze_rc, parallel, report_batches, report_rc", [
    (0, 1, [["t1"], ["t2"], ["t3"]], 0),   # one instance at a time
    (0, 2, [["t1", "t2"], ["t3"]], 0),     # batches of `parallel`
    (1, 2, [], "skipped (when)"),          # `when` false: the step is done without running
])
def test_waves_run_in_order_with_when_and_batches(analyze_rc, parallel, report_batches, report_rc):
    run_batch, batches = recording_runner({"analyze": analyze_rc})
    rows, results = run_waves(wave_job(parallel), ["pg1"], run_batch)
    assert batches[0] == ("pg1", "analyze", [{}])
    assert [[i["tbl"] for i in b[2]] for b in batches[1:]] == report_batches
    assert results["analyze"].rc == analyze_rc
    assert {r["rc"] for r in rows if r["step"] == "report"} == {report_rc}


def test_a_when_rule_that_errors_skips_the_step_and_warns():
    # The loader refuses such a rule; the runner still treats one as pgquartz does (false).
    job = wave_job()
    job.steps["report"] = job.steps["report"].model_copy(update={"when": ['lt .Steps.analyze.Rc "a"']})
    run_batch, batches = recording_runner({})
    warnings: list[str] = []
    rows, results = run_waves(job, ["pg1"], run_batch, warn=warnings.append)
    assert [b[1] for b in batches] == ["analyze"]
    assert results["report"] == StepResult() and len(warnings) == 1 and warnings[0].startswith("report: when rule error")


def test_every_node_runs_every_wave_in_turn():
    run_batch, batches = recording_runner({})
    run_waves(wave_job(parallel=3), ["pg1", "pg2"], run_batch)
    assert [(b[0], b[1]) for b in batches] == [("pg1", "analyze"), ("pg1", "report"), ("pg2", "analyze"), ("pg2", "report")]


# --------------------------------------------------------------------------- issue 13 item 7: pgquartz semantics
#
# Each test below names the pgquartz source it follows (pgvillage-tools/pgquartz).


# 1. Shell checks: `expected` / `unexpected` against stdout and stderr separately, on the quoted
#    rendering (pkg/jobs/check.go RunOsCheck + CheckOutput, pkg/jobs/result.go Result.String).

@pytest.mark.parametrize("fields, stdout, stderr, passed, reason", [
    # `expected` must be in stdout *and* in stderr: an empty stderr renders as [ '' ].
    ({"expected": "ok"}, "ok\n", "", False, "expected text 'ok' not found in stderr [ '' ]"),
    ({"expected": "ok"}, "", "ok\n", False, "expected text 'ok' not found in stdout [ '' ]"),
    ({"expected": "ok"}, "ok\n", "ok\n", True, "ok"),
    # `unexpected` fails the check when it is in either.
    ({"unexpected": "ERROR"}, "fine\n", "ERROR: disk full\n", False, "unexpected text 'ERROR' found in stderr"),
    ({"unexpected": "ERROR"}, "ERROR\n", "", False, "unexpected text 'ERROR' found in stdout"),
    ({"unexpected": "ERROR"}, "fine\n", "", True, "ok"),
    # The rendering, not the raw text: `'` is doubled, lines are `'...'` joined by ", ".
    ({"expected": "it's"}, "it's\n", "it's\n", False, "not found in stdout [ 'it''s' ]"),
    ({"expected": "it''s"}, "it's\n", "it's\n", True, "ok"),
    ({"expected": "a', 'b"}, "a\nb\n", "a\nb\n", True, "ok"),  # spans two lines
    ({"expected": "'ok'"}, "ok\n", "not ok\n", False, "not found in stderr [ 'not ok' ]"),  # whole line
    ({"unexpected": "''"}, "x\n", "", False, "found in stderr [ '' ]"),  # empty output is one empty line
])
def test_shell_check_matches_stdout_and_stderr_separately_on_the_rendering(
        fields: dict[str, Any], stdout: str, stderr: str, passed: bool, reason: str) -> None:
    ok, why = check_passed(_check(type="shell", **fields), 0, stdout, stderr)
    assert (ok, reason in why) == (passed, True), why


@pytest.mark.parametrize("fields, rc, rows, passed, reason", [
    # A value it's is it''s in the row (pkg/pg/row.go) and it''''s in the rendering.
    ({"expected": "it''''s"}, 0, ["{s}={it''s}"], True, "ok"),
    ({"expected": "it''s"}, 0, ["{s}={it''s}"], False, "not found in stdout [ '{s}={it''''s}' ]"),
    ({"expected": "{s}={it''s}"}, 0, ["{s}={it''s}"], False, "not found in stdout"),
    ({"unexpected": "''"}, 0, [], True, "ok"),  # no rows renders as [  ], not as one empty line
    # A failed query has no output in pgquartz (Connections.Execute returns nil on error), so
    # nothing the runner still holds of it can satisfy `expected`.
    ({"rc": 1, "expected": "partial"}, 1, ["partial"], False, "expected text 'partial' not found in stdout [  ]"),
    ({"rc": 1, "unexpected": "partial"}, 1, ["partial"], True, "ok"),
    # stderr is never searched for SQL.
    ({"unexpected": "boom"}, 0, ["{x}={1}"], True, "ok"),
])
def test_sql_check_matches_its_rows_only(fields: dict[str, Any], rc: int, rows: list[str], passed: bool,
                                         reason: str) -> None:
    ok, why = check_passed(_check(type="pg", **fields), rc, rows, "boom")
    assert (ok, reason in why) == (passed, True), why


def test_render_result_is_pgquartz_result_string() -> None:
    assert render_result(["a", "it's"]) == "[ 'a', 'it''s' ]"
    assert render_result([]) == "[  ]" and render_result(output_lines("")) == "[ '' ]"
    # the `.String` a when rule sees is the same text
    assert evaluate_when('eq .Steps.a.StdOut.String "[ \'x\', \'y\' ]"', results(a=(0, "x\ny\n")))


# 2. A failed command's output is dropped (pkg/jobs/command.go: RunOsCommand returns before it
#    stores stdout/stderr; Run assigns Execute's nil result for SQL).

def _cmd(**fields: Any) -> Any:
    from tasks.pgquartz import Command
    return Command.model_validate({"inline": "x", **fields})


@pytest.mark.parametrize("fields, rc, stdout, stderr, kept", [
    ({"type": "shell"}, 0, "a\nb\n", "", (["a", "b"], [""])),
    ({"type": "shell"}, 0, "", "", ([""], [""])),  # NewResultFromString("") is one empty line
    ({"type": "shell"}, 3, "partial\n", "boom\n", ([], [])),
    ({"type": "pg"}, 0, ["{n}={1}"], "", (["{n}={1}"], [])),
    ({"type": "pg"}, 0, [], "", ([], [])),
    ({"type": "pg"}, 1, ["{n}={1}"], "ERROR: boom", ([], [])),
])
def test_command_output_drops_a_failed_commands_output(fields: dict[str, Any], rc: int, stdout: Any, stderr: str,
                                                       kept: tuple[list[str], list[str]]) -> None:
    assert command_output(_cmd(**fields), rc, stdout, stderr) == kept


def test_run_commands_stops_at_the_first_failure_and_keeps_only_what_succeeded() -> None:
    commands = [_cmd(type="shell", name="one"), _cmd(type="pg", name="two"), _cmd(type="shell", name="three")]
    answers = {"one": (0, "first\n", "note\n"), "two": (1, ["{n}={1}"], "ERROR"), "three": (0, "never", "")}
    ran: list[str] = []

    def run(command: Any) -> tuple[int, Any, str]:
        ran.append(command.name)
        return answers[command.name]

    assert run_commands(commands, run) == InstanceResult({}, 1, ["first"], ["note"])
    assert ran == ["one", "two"]
    assert run_commands(commands[:1], run, {"tbl": "t1"}).instance == {"tbl": "t1"}


def when_job(tmp_path: Path) -> Path:
    data = {"parallel": 1, "steps": {
        "probe": {"commands": [{"name": "probe", "type": "shell", "inline": "echo partial; exit 3"}]},
        "after": {"depends": ["probe"], "when": ['.Steps.probe.Instances.StdOut.Contains "partial"'],
                  "commands": [{"type": "shell", "inline": "true"}]}}}
    return write_job(tmp_path, data, "probe.yml")


def test_a_when_rule_cannot_see_a_failed_commands_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = when_job(tmp_path)
    monkeypatch.setattr(tab, "get_run_logger", lambda: logging.getLogger("tests.tab"))
    monkeypatch.setattr(tab, "run_command", lambda *a: (3, "partial\n", "failed\n"))
    row = tab.run_step_instance.fn("lab", str(path), "probe", {}, "pg1", 0.0)
    assert row == InstanceResult({}, 3, [], [])
    job = load_job(path)
    _, step_results = run_waves(job, ["pg1"], lambda node, step, insts: [row])
    assert step_results["probe"].rc == 3
    assert not step_should_run(job.steps["after"], step_results)


def test_the_lines_of_successful_commands_reach_when_rules_unchanged() -> None:
    r = StepResult([InstanceResult({}, 0, ["a", ""], []), InstanceResult({}, 1, [], [])])
    assert r.stdout_lines == ("a", "") and r.stderr_lines == ()
    assert evaluate_when('.Steps.s.StdOut.ContainsLine ""', {"s": r})
    assert evaluate_when('eq (len .Steps.s.StdErr) 0', {"s": r})


# 3. `type: shell` file scripts must be executable (pkg/jobs/command.go and check.go
#    VerifyScriptFile; Config.Verify panics before any step runs).

def shell_file_job(tmp_path: Path, mode: int, *, type_: str = "shell", where: str = "step") -> Path:
    script = tmp_path / "run.sh"
    script.write_text("echo hi\n")
    script.chmod(mode)
    cmd = {"name": "run", "file": "run.sh", **({"type": type_} if type_ else {})}
    data: dict[str, Any] = {"parallel": 1, "steps": {"s": {"commands": [
        cmd if where == "step" else {"type": "shell", "inline": "true"}]}}}
    if where == "check":
        data["checks"] = [cmd]
    return write_job(tmp_path, data)


@pytest.mark.parametrize("where, key", [("step", "steps.s.commands[0].file"), ("check", "checks[0].file")])
def test_a_non_executable_shell_script_is_refused_at_load(tmp_path: Path, where: str, key: str) -> None:
    path = shell_file_job(tmp_path, 0o644, where=where)
    with pytest.raises(JobFileError) as err:
        load_job(path)
    (problem,) = err.value.problems
    assert (problem.file, problem.key) == (str(path), key)
    assert problem.reason.startswith("script 'run.sh' is not executable (mode 0644")
    assert f"chmod +x {tmp_path.resolve() / 'run.sh'}" in problem.reason


@pytest.mark.parametrize("mode", [0o755, 0o744, 0o701, 0o711])
def test_an_executable_shell_script_loads(tmp_path: Path, mode: int) -> None:
    load_job(shell_file_job(tmp_path, mode))


def test_only_type_shell_scripts_need_the_execute_bit(tmp_path: Path) -> None:
    # pgquartz checks `type: shell` only; an untyped shell file (no connections) is not verified.
    load_job(shell_file_job(tmp_path, 0o644, type_=""))


@pytest.mark.parametrize("mode, uid_is_mine, gid_is_mine, ok", [
    (0o001, False, False, True),
    (0o100, True, False, True), (0o100, False, True, False),
    (0o010, False, True, True), (0o010, True, False, False),
    (0o644, True, True, False),
])
def test_executable_by_me_is_pgquartz_rule(mode: int, uid_is_mine: bool, gid_is_mine: bool, ok: bool) -> None:
    status = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, os.getuid() if uid_is_mine else os.getuid() + 1,
                             os.getgid() if gid_is_mine else os.getgid() + 1, 0, 0, 0, 0))
    assert executable_by_me(status) is ok


# 4. A logFile that does not exist is refused (internal/config.go NewConfig: os.Stat(LogFile)
#    fails -> main's log.Fatal, exit 1, before the lock).

def test_a_missing_log_file_is_refused_at_load(tmp_path: Path) -> None:
    path = write_job(tmp_path, mutate(lambda d: d.update(logFile="logs/vacuum.log")))
    with pytest.raises(JobFileError) as err:
        load_job(path)
    (problem,) = err.value.problems
    assert (problem.key, problem.reason.split(" (")[0]) == ("logFile", "'logs/vacuum.log' does not exist")
    assert str(tmp_path.resolve() / "logs" / "vacuum.log") in problem.reason


@pytest.mark.parametrize("log_file", ["logs", "logs/vacuum.log", "ABSOLUTE"])
def test_an_existing_log_file_or_directory_loads(tmp_path: Path, log_file: str) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "vacuum.log").write_text("")
    value = str(tmp_path / "logs") if log_file == "ABSOLUTE" else log_file
    job = load_job(write_job(tmp_path, mutate(lambda d: d.update(logFile=value))))
    assert job.log_file_path is not None and job.log_file_path.exists()


# 5. The role is checked before every SQL command, on the connection the command then uses
#    (pkg/jobs/connection.go Execute -> pkg/pg/conn.go VerifyRole; Connections hold pg.Conn by
#    value, so each command dials afresh and asks again).

class FakeDatabase:
    """What tasks.tab._sql talks to: answers the role query, records every other statement."""

    def __init__(self, roles: list[str]) -> None:
        self.roles = roles  # the answer to each successive role query
        self.connections = 0
        self.role_queries = 0
        self.statements: list[str] = []
        self.logins: list[str] = []

    def postgres(self, endpoint: Any, *, statement_timeout_ms: int) -> Any:
        db = self
        self.logins.append(endpoint.user)

        class Cursor:
            description = (SimpleNamespace(name="n"),)

            def __enter__(self) -> Self:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def execute(self, query: str, args: Any) -> None:
                db.statements.append(query)

            def fetchall(self) -> list[tuple]:
                return [(len(db.statements),)]

        class Pg:
            def __enter__(self) -> Self:
                db.connections += 1
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def scalar(self, query: str) -> str:
                assert query == ROLE_QUERY
                db.role_queries += 1
                return db.roles.pop(0)

            def query(self, query: Any) -> list:
                db.statements.append(str(query))
                return []

            def connect(self) -> Any:
                return SimpleNamespace(cursor=Cursor)

        return Pg()


JOB_ROLE = JobRole(user="bouwsteen_job", password="job-pw", member_of=("app",))


def sql_job(tmp_path: Path, role: str = "primary", check_role: str = "", user: str = "") -> Path:
    params = {"dbname": "postgres", **({"user": user} if user else {})}
    data = {"parallel": 1,
            "connections": {"pg": {"role": role, "conn_params": params}},
            "steps": {"s": {"commands": [{"name": "one", "type": "pg", "inline": "select 1"},
                                         {"name": "two", "type": "pg", "inline": "select 2"}]}},
            "checks": [{"name": "c", "type": "pg", "inline": "select 3", "role": check_role or role}]}
    return write_job(tmp_path, data, "sqljob.yml")


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], FakeDatabase]:
    def make(roles: list[str]) -> FakeDatabase:
        db = FakeDatabase(roles)
        inventory = SimpleNamespace(host=lambda name: SimpleNamespace(name=name, address="10.0.0.11"),
                                    cluster=SimpleNamespace(postgres=SimpleNamespace(port=5432)))
        ctx = SimpleNamespace(name="lab", inventory=inventory, client_tls=lambda role=None: None)
        monkeypatch.setattr(tab, "context_for", lambda cluster: ctx)
        monkeypatch.setattr(tab, "job_role_of", lambda ctx: JOB_ROLE)
        monkeypatch.setattr(tab, "Postgres", db.postgres)
        monkeypatch.setattr(tab, "get_run_logger", lambda: logging.getLogger("tests.tab"))
        return db
    return make


def test_the_role_is_checked_before_every_sql_command(tmp_path: Path, database: Any) -> None:
    db = database(["primary", "standby"])  # a switchover between the two commands
    row = tab.run_step_instance.fn("lab", str(sql_job(tmp_path)), "s", {}, "pg1", time.monotonic() + 60)
    assert db.role_queries == 2 and db.connections == 2
    assert db.statements == ["select 1"]  # the second command never ran on the standby
    assert row == InstanceResult({}, 1, ["{n}={1}"], [])
    assert db.logins == ["bouwsteen_job", "bouwsteen_job"]  # never the superuser


def test_a_role_mismatch_is_a_failed_command_with_no_output(tmp_path: Path, database: Any) -> None:
    database(["standby"])
    job = load_job(sql_job(tmp_path))
    rc, rows, error = tab.run_command("lab", "pg2", job, job.steps["s"].commands[0], {}, time.monotonic() + 60)
    assert (rc, rows) == (1, [])
    assert error == "pg2: the server is standby, this command needs the primary (role check before every SQL command)"


def test_role_all_asks_nothing(tmp_path: Path, database: Any) -> None:
    db = database([])
    row = tab.run_step_instance.fn("lab", str(sql_job(tmp_path, role="all")), "s", {}, "pg1", time.monotonic() + 60)
    assert db.role_queries == 0 and row.rc == 0 and db.statements == ["select 1", "select 2"]


def test_checks_check_the_role_too(tmp_path: Path, database: Any) -> None:
    db = database(["primary"])
    verdict = tab.is_check_passed.fn("lab", str(sql_job(tmp_path, check_role="standby")), 0, {}, "pg1",
                                     time.monotonic() + 60)
    assert db.statements == [] and verdict.ok is False and not verdict
    assert verdict.reason == "query failed but was expected to succeed"
    assert verdict.as_dict() == {"check": "c", "instance": {}, "node": "pg1", "passed": False,
                                 "reason": "query failed but was expected to succeed"}


@pytest.mark.parametrize("wanted, actual, refused", [
    (None, "standby", False), ("all", "standby", False), ("primary", "primary", False),
    ("primary", "standby", True), ("standby", "primary", True),
])
def test_role_problem(wanted: str | None, actual: str, refused: bool) -> None:
    assert (role_problem(wanted, actual) is not None) is refused


# 6. The job's own etcdConfig.endpoints (pkg/etcd/config.go SetDefaults: none or [] ->
#    [localhost:2379]; pkg/etcd/locker.go hands them to clientv3 unchanged).

CLUSTER_ETCD = ["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"]


@pytest.mark.parametrize("etcd, given, lock_endpoints", [
    ({}, False, CLUSTER_ETCD),
    ({"endpoints": []}, False, CLUSTER_ETCD),  # pgquartz: an empty list is the default too
    ({"endpoints": None}, False, CLUSTER_ETCD),
    ({"endpoints": ["etcd-a:2379", "http://10.9.9.9:2379/"]}, True, ["etcd-a:2379", "10.9.9.9:2379"]),
    ({"endpoints": ["HTTP://[fd00::1]:2379"]}, True, ["[fd00::1]:2379"]),
    # loopback = the etcd member on the node pgquartz runs on: the cluster's members, at that port
    ({"endpoints": ["localhost:2379"]}, True, CLUSTER_ETCD),
    ({"endpoints": ["127.0.0.1:12379", "[::1]:12379"]}, True,
     ["10.0.0.11:12379", "10.0.0.12:12379", "10.0.0.13:12379"]),
])
def test_lock_endpoints(tmp_path: Path, etcd: dict[str, Any], given: bool, lock_endpoints: list[str]) -> None:
    job = load_job(write_job(tmp_path, mutate(lambda d: d.update(etcdConfig=etcd))))
    assert job.etcd_config.endpoints_given is given
    assert job.etcd_config.lock_endpoints(CLUSTER_ETCD) == lock_endpoints


def test_the_sample_job_keeps_locking_through_the_clusters_etcd() -> None:
    job = load_job(SAMPLE_JOB)
    assert job.etcd_config.endpoints == ["localhost:2379"] and job.etcd_config.endpoints_given
    assert job.etcd_config.lock_endpoints(CLUSTER_ETCD) == CLUSTER_ETCD


@pytest.mark.parametrize("endpoint, reason", [
    ("https://etcd-a:2379", "asks for TLS"),
    ("unix:///run/etcd.sock", "unix socket"),
    ("etcd-a", "needs a host and a port"),
    ("http://etcd-a", "needs a host and a port"),
    ("etcd-a:70000", "is not host:port"),
    ("dns:///etcd-a:2379", "unsupported scheme 'dns'"),
])
def test_unreachable_etcd_endpoints_are_refused_at_load(tmp_path: Path, endpoint: str, reason: str) -> None:
    with pytest.raises(JobFileError) as err:
        load_job(write_job(tmp_path, mutate(lambda d: d["etcdConfig"].update(endpoints=["etcd-b:2379", endpoint]))))
    (problem,) = err.value.problems
    assert problem.key == "etcdConfig.endpoints[1]" and reason in problem.reason


@pytest.mark.parametrize("endpoint, address, loopback", [
    ("localhost:2379", "localhost:2379", True), ("http://127.0.0.2:2379", "127.0.0.2:2379", True),
    ("[::1]:2379", "[::1]:2379", True), ("etcd1.localhost:2379", "etcd1.localhost:2379", True),
    ("10.0.0.11:2379", "10.0.0.11:2379", False), ("http://etcd1:2379/v3", "etcd1:2379", False),
])
def test_etcd_endpoint_address(endpoint: str, address: str, loopback: bool) -> None:
    assert etcd_endpoint_address(endpoint) == address
    assert is_loopback_endpoint(address) is loopback


def test_the_sample_jobs_checks_judge_the_labs_rows_as_before() -> None:
    # The quoted rendering (item 1) must not change the verdicts of the lab's own job.
    no_expired, index_there = load_job(SAMPLE_JOB).checks
    assert check_passed(no_expired, 0, ["{verdict}={purge_complete}"], "") == (True, "ok")
    assert check_passed(no_expired, 0, ["{verdict}={purge_incomplete}"], "")[0] is False
    assert check_passed(index_there, 0, ["{logged_at_index}={audit_log_logged_at_idx}"], "") == (True, "ok")
    assert check_passed(index_there, 0, ["{logged_at_index}={MISSING}"], "")[0] is False
