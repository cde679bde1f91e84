"""tasks/planning/build.py with hand-built HostSnapshots; tasks/reporting.py never shows file contents."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tasks.adapters.commands import ManagedFile, Unit
from tasks.adapters.probe import MARKER_PATH, DataDirState, FileState, HostSnapshot, UnitState
from tasks.planning.build import (
    BuildPlan,
    DesiredHost,
    FileChange,
    HostPlan,
    ReleaseFloor,
    host_preflight,
    marker_file,
    parse_release,
    plan_build,
    plan_host,
    release_problem,
)
from tasks.reporting import plan_markdown

CLUSTER = "lab"
SECRET = "S3cret-su-DO-NOT-SHOW"
PATRONI_YML = "/etc/patroni/config.yml"
ETCD_ENV = "/etc/default/etcd"

PATRONI_FILE = ManagedFile(PATRONI_YML, f"superuser:\n  password: {SECRET}\n", owner="postgres", group="postgres",
                           mode=0o600, secret=True)
ETCD_FILE = ManagedFile(ETCD_ENV, "ETCD_NAME=pg1\n", owner="root", mode=0o644)
MARKER = marker_file(CLUSTER)


def db_layer(host: str = "pg1", **changes: Any) -> DesiredHost:
    want = DesiredHost(
        host=host,
        packages=("postgresql-15", "patroni"),
        files=(MARKER, PATRONI_FILE),
        units=(Unit("patroni.service", reload_on=(PATRONI_YML,)),),
        ports={5432: frozenset({"postgres", "postmaster"}), 8008: frozenset({"patroni", "python3"})},
        cluster_member=True,
        needs_data_dir=True,
    )
    return dataclasses.replace(want, **changes)


def etcd_layer(host: str = "pg1") -> DesiredHost:
    return DesiredHost(
        host=host,
        packages=("etcd-server", "etcd-client"),
        files=(MARKER, ETCD_FILE),
        units=(Unit("etcd.service", restart_on=(ETCD_ENV,)),),
        ports={2379: frozenset({"etcd"}), 2380: frozenset({"etcd"})},
    )


def state_of(f: ManagedFile) -> FileState:
    return FileState(sha256=f.sha256, owner=f"{f.owner}:{f.owner_group}", mode=f.mode)


RUNNING = UnitState(enabled="enabled", active="active", main_pid=100, loaded="loaded")


def converged(host: str = "pg1", **changes: Any) -> HostSnapshot:
    """A snapshot of a host that already matches db_layer and etcd_layer exactly."""
    snap = HostSnapshot(
        host=host,
        hostname=f"{host}.bouwsteen.lab",
        os_id="debian",
        os_version="12",
        os_pretty="Debian GNU/Linux 12 (bookworm)",
        packages={"postgresql-15": "15.8-0+deb12u1", "patroni": "3.0.2-1", "etcd-server": "3.4.23-4",
                  "etcd-client": "3.4.23-4"},
        files={f.path: state_of(f) for f in (MARKER, PATRONI_FILE, ETCD_FILE)},
        marker_cluster=CLUSTER,
        data_dir=DataDirState(exists=True, entries=23, pg_version="15"),
        units={"patroni.service": RUNNING, "etcd.service": RUNNING},
        listeners={5432: "postgres", 8008: "python3", 2379: "etcd", 2380: "etcd"},
    )
    return dataclasses.replace(snap, **changes)


def fresh(host: str = "pg1", **changes: Any) -> HostSnapshot:
    """A newly installed Debian 12 host: nothing of ours on it."""
    snap = converged(
        host,
        packages={},
        files={},
        marker_cluster=None,
        data_dir=DataDirState(exists=False, entries=0, pg_version=None),
        units={},
        listeners={},
    )
    return dataclasses.replace(snap, **changes)


def marker_json(cluster: str) -> str:
    return json.dumps({"cluster": cluster}) + "\n"


def test_marker_file() -> None:
    assert MARKER == ManagedFile(MARKER_PATH, '{"cluster": "lab"}\n', owner="root", mode=0o644)
    assert not MARKER.secret


# ------------------------------------------------------------------------------ host_preflight

NOT_EMPTY = DataDirState(exists=True, entries=3, pg_version="15")

PREFLIGHT = [
    ("converged-ours", converged(), db_layer(), False, []),
    ("fresh-host", fresh(), db_layer(), False, []),
    ("short-hostname", converged(hostname="pg1"), db_layer(), False, []),
    ("unsupported-os-pretty", converged(os_id="ubuntu", os_version="22.04", os_pretty="Ubuntu 22.04.4 LTS"),
     db_layer(), False, ["pg1: unsupported OS 'Ubuntu 22.04.4 LTS' (need Debian 12)"]),
    ("unsupported-os-no-pretty", converged(os_version="11", os_pretty=""), db_layer(), False,
     ["pg1: unsupported OS 'debian 11' (need Debian 12)"]),
    ("hostname-mismatch", converged(hostname="pg2.bouwsteen.lab"), db_layer(), False,
     ["pg1: answers as 'pg2.bouwsteen.lab'; the inventory address may point at another machine"]),
    ("other-clusters-marker", fresh(marker_cluster="prod"), db_layer(), False,
     ["pg1: already belongs to cluster 'prod'"]),
    ("data-dir-not-empty-no-marker", fresh(data_dir=NOT_EMPTY), db_layer(), False,
     ["pg1: data directory is not empty (3 entries, PostgreSQL 15) and the host is not part of cluster 'lab'; "
      "refusing to overwrite it (pass adopt_existing=True to take it over)"]),
    ("data-dir-not-empty-no-pg-version", fresh(data_dir=DataDirState(True, 1, None)), db_layer(), False,
     ["pg1: data directory is not empty (1 entries) and the host is not part of cluster 'lab'; "
      "refusing to overwrite it (pass adopt_existing=True to take it over)"]),
    ("data-dir-not-empty-adopt", fresh(data_dir=NOT_EMPTY), db_layer(), True, []),
    ("data-dir-not-empty-ours", converged(data_dir=NOT_EMPTY), db_layer(), False, []),
    ("data-dir-not-empty-etcd-layer", fresh(data_dir=NOT_EMPTY), etcd_layer(), False, []),
    ("data-dir-empty-dir", fresh(data_dir=DataDirState(True, 0, None)), db_layer(), False, []),
    ("port-unexpected-process-ours", converged(listeners={5432: "nginx", 8008: "python3"}), db_layer(), False,
     ["pg1: port 5432 is already in use by nginx"]),
    ("port-own-process-ours", converged(listeners={5432: "postmaster", 8008: "patroni"}), db_layer(), False, []),
    ("port-own-process-not-ours", fresh(listeners={5432: "postgres"}), db_layer(), False,
     ["pg1: port 5432 is already in use by postgres"]),
    ("port-unknown-process", converged(listeners={8008: ""}), db_layer(), False,
     ["pg1: port 8008 is already in use by an unknown process"]),
    ("port-etcd-by-postgres", converged(listeners={2379: "postgres"}), etcd_layer(), False,
     ["pg1: port 2379 is already in use by postgres"]),
    ("port-not-wanted-ignored", fresh(listeners={22: "sshd", 9100: "node_exporter"}), db_layer(), False, []),
    ("ports-sorted", converged(listeners={8008: "java", 5432: "mysqld"}), db_layer(), False,
     ["pg1: port 5432 is already in use by mysqld", "pg1: port 8008 is already in use by java"]),
    ("everything-wrong", fresh(os_id="rhel", os_version="9", os_pretty="", hostname="db-old", marker_cluster="prod",
                               data_dir=NOT_EMPTY, listeners={5432: "postgres"}), db_layer(), False,
     ["pg1: unsupported OS 'rhel 9' (need Debian 12)",
      "pg1: answers as 'db-old'; the inventory address may point at another machine",
      "pg1: already belongs to cluster 'prod'",
      "pg1: data directory is not empty (3 entries, PostgreSQL 15) and the host is not part of cluster 'lab'; "
      "refusing to overwrite it (pass adopt_existing=True to take it over)",
      "pg1: port 5432 is already in use by postgres"]),
]


PATRONI_FLOOR = ReleaseFloor("patroni", "3.0.3", "leader key overwritten after a partition")
FLOORED = db_layer(release_floors=(PATRONI_FLOOR,))
PREFLIGHT += [
    ("release-below-floor", converged(tools={"patroni": "patroni 3.0.2"}), FLOORED, False,
     ["pg1: patroni 3.0.2 is older than 3.0.3, the oldest release this building block runs: "
      "leader key overwritten after a partition"]),
    ("release-at-floor", converged(tools={"patroni": "patroni 3.0.3"}), FLOORED, False, []),
    ("release-above-floor", converged(tools={"patroni": "patroni 4.0.7"}), FLOORED, False, []),
    # Not installed yet: checked again right after apt installed it, before anything is configured.
    ("release-not-installed", fresh(tools={"patroni": None}), FLOORED, False, []),
    ("release-not-probed", fresh(), FLOORED, False, []),
]


@pytest.mark.parametrize(("snap", "want", "adopt", "expected"), [c[1:] for c in PREFLIGHT], ids=[c[0] for c in PREFLIGHT])
def test_host_preflight(snap: HostSnapshot, want: DesiredHost, adopt: bool, expected: list[str]) -> None:
    assert host_preflight(CLUSTER, want, snap, adopt_existing=adopt) == expected


@pytest.mark.parametrize(
    ("snap", "expected"),
    [(converged(), []), (fresh(), ["pg1: not part of cluster 'lab'"])],
    ids=["member", "stranger"],
)
def test_host_preflight_allow_join_false(snap: HostSnapshot, expected: list[str]) -> None:
    assert host_preflight(CLUSTER, db_layer(), snap, adopt_existing=False, allow_join=False) == expected


# ------------------------------------------------------------------------------ plan_host


def files_with(path: str, state: FileState | None) -> dict[str, FileState | None]:
    files = dict(converged().files)
    if state is None:
        files.pop(path)
    else:
        files[path] = state
    return files


PATRONI_STATE = state_of(PATRONI_FILE)
ETCD_STATE = state_of(ETCD_FILE)
STOPPED = UnitState(enabled="enabled", active="failed", main_pid=0, loaded="loaded")
DISABLED = UnitState(enabled="disabled", active="active", main_pid=100, loaded="loaded")

PLAN_HOST = [
    ("noop", db_layer(), converged(), HostPlan("pg1")),
    ("package-not-installed", db_layer(), converged(packages={"postgresql-15": "15.8", "patroni": None}),
     HostPlan("pg1", install=("patroni",))),
    ("package-unknown", db_layer(), converged(packages={}), HostPlan("pg1", install=("postgresql-15", "patroni"))),
    ("file-create", db_layer(), converged(files=files_with(PATRONI_YML, None)),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "create", True),), reload=("patroni.service",))),
    ("file-update", db_layer(), converged(files=files_with(PATRONI_YML, dataclasses.replace(PATRONI_STATE, sha256="0" * 64))),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "update", True),), reload=("patroni.service",))),
    ("file-fix-owner", db_layer(), converged(files=files_with(PATRONI_YML, dataclasses.replace(PATRONI_STATE, owner="root:root"))),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "fix owner/mode", True),))),
    ("file-fix-group", db_layer(),
     converged(files=files_with(PATRONI_YML, dataclasses.replace(PATRONI_STATE, owner="postgres:root"))),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "fix owner/mode", True),))),
    ("file-fix-mode", db_layer(), converged(files=files_with(PATRONI_YML, dataclasses.replace(PATRONI_STATE, mode=0o644))),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "fix owner/mode", True),))),
    ("marker-create-not-secret", db_layer(), converged(files=files_with(MARKER_PATH, None)),
     HostPlan("pg1", files=(FileChange(MARKER_PATH, "create", False),))),
    ("unit-not-running", db_layer(), converged(units={"patroni.service": STOPPED}),
     HostPlan("pg1", start=("patroni.service",))),
    ("unit-running-but-disabled", db_layer(), converged(units={"patroni.service": DISABLED}),
     HostPlan("pg1", start=("patroni.service",))),
    ("unit-unknown", db_layer(), converged(units={}), HostPlan("pg1", start=("patroni.service",))),
    ("unit-stopped-and-file-changed-starts-only", db_layer(),
     converged(units={}, files=files_with(PATRONI_YML, None)),
     HostPlan("pg1", files=(FileChange(PATRONI_YML, "create", True),), start=("patroni.service",))),
    ("restart-on-changed", etcd_layer(), converged(files=files_with(ETCD_ENV, dataclasses.replace(ETCD_STATE, sha256="1" * 64))),
     HostPlan("pg1", files=(FileChange(ETCD_ENV, "update", False),), restart=("etcd.service",))),
    ("restart-on-owner-only-no-restart", etcd_layer(),
     converged(files=files_with(ETCD_ENV, dataclasses.replace(ETCD_STATE, mode=0o600))),
     HostPlan("pg1", files=(FileChange(ETCD_ENV, "fix owner/mode", False),))),
    ("unrelated-file-changed-no-restart", etcd_layer(), converged(files=files_with(MARKER_PATH, None)),
     HostPlan("pg1", files=(FileChange(MARKER_PATH, "create", False),))),
    ("fresh-host-everything", db_layer(), fresh(),
     HostPlan("pg1", install=("postgresql-15", "patroni"),
              files=(FileChange(MARKER_PATH, "create", False), FileChange(PATRONI_YML, "create", True)),
              start=("patroni.service",))),
]


@pytest.mark.parametrize(("want", "snap", "expected"), [c[1:] for c in PLAN_HOST], ids=[c[0] for c in PLAN_HOST])
def test_plan_host(want: DesiredHost, snap: HostSnapshot, expected: HostPlan) -> None:
    plan = plan_host(want, snap)
    assert plan == expected
    assert plan.is_noop is (expected == HostPlan("pg1"))


def test_plan_host_restart_wins_over_reload() -> None:
    want = db_layer(units=(Unit("patroni.service", restart_on=(PATRONI_YML,), reload_on=(PATRONI_YML,)),))
    snap = converged(files=files_with(PATRONI_YML, None))
    assert plan_host(want, snap).restart == ("patroni.service",)
    assert plan_host(want, snap).reload == ()


@pytest.mark.parametrize(
    ("plan", "summary"),
    [
        (HostPlan("pg1"), "no change"),
        (HostPlan("pg1", install=("a", "b")), "install a, b"),
        (HostPlan("pg1", install=("patroni",), files=(FileChange("/x", "create", False), FileChange("/y", "update", True)),
                  start=("patroni.service",), restart=("etcd.service",), reload=("haproxy.service",)),
         "install patroni; write /x (create), /y (update); start patroni.service; restart etcd.service; "
         "reload haproxy.service"),
    ],
)
def test_host_plan_summary(plan: HostPlan, summary: str) -> None:
    assert plan.summary() == summary


# ------------------------------------------------------------------------------ plan_build

THREE = ["pg1", "pg2", "pg3"]


def build(snapshots: dict[str, HostSnapshot], *, initialized: bool, candidates: list[str] = THREE,
          **kwargs: Any) -> BuildPlan:
    return plan_build(CLUSTER, [db_layer(h) for h in THREE], snapshots, initialized=initialized,
                      bootstrap_candidates=candidates, **kwargs)


WITH_DATA = DataDirState(exists=True, entries=23, pg_version="15")
EMPTY = DataDirState(exists=True, entries=0, pg_version=None)


@pytest.mark.parametrize(
    ("with_data", "initialized", "candidates", "bootstrap_on"),
    [
        ([], False, THREE, "pg1"),
        (["pg2"], False, THREE, "pg2"),
        (["pg3", "pg2"], False, THREE, "pg2"),
        (["pg3"], False, THREE, "pg3"),
        ([], False, ["pg3", "pg1", "pg2"], "pg3"),
        (["pg1", "pg2"], False, ["pg2", "pg1"], "pg2"),
        (["pg2"], True, THREE, None),
        ([], True, THREE, None),
    ],
)
def test_plan_build_bootstrap_on(with_data: list[str], initialized: bool, candidates: list[str],
                                 bootstrap_on: str | None) -> None:
    # Data on a host of our own cluster (marker set) is a half-finished earlier run, not a refusal.
    snaps = {h: converged(h, data_dir=WITH_DATA if h in with_data else EMPTY) for h in THREE}
    plan = build(snaps, initialized=initialized, candidates=candidates)
    assert plan.bootstrap_on == bootstrap_on
    assert plan.refusals == ()


def test_plan_build_no_candidates_refused() -> None:
    plan = build({h: converged(h) for h in THREE}, initialized=False, candidates=[])
    assert plan.refusals == ("no database host can initialise the cluster",)
    assert plan.bootstrap_on is None
    assert not plan.is_noop


def test_plan_build_refusals_aggregated_in_order() -> None:
    snaps = {
        "pg1": converged("pg1", hostname="pg9"),
        "pg2": fresh("pg2", marker_cluster="prod"),
        # pg3: no snapshot
    }
    plan = build(snaps, initialized=True, refusals=["etcd: member list has 'old1', not in the inventory"])
    assert plan.refusals == (
        "etcd: member list has 'old1', not in the inventory",
        "pg1: answers as 'pg9'; the inventory address may point at another machine",
        "pg2: already belongs to cluster 'prod'",
        "pg3: no snapshot (unreachable?)",
    )
    assert [h.host for h in plan.hosts] == ["pg1", "pg2"]
    assert not plan.is_noop


def test_plan_build_names_why_a_host_is_unreachable_once() -> None:
    # The probe's own refusal stands in for "no snapshot", once for a host of several layers.
    desired = [etcd_layer("pg1"), db_layer("pg1"), db_layer("pg2"), db_layer("pg3")]
    plan = plan_build(CLUSTER, desired, {"pg2": converged("pg2")}, initialized=True, bootstrap_candidates=[],
                      refusals=["cluster lab has no primary (view.leader=None)"],
                      unreachable={"pg1": "pg1: unreachable: timed out"})
    assert plan.refusals == (
        "cluster lab has no primary (view.leader=None)",
        "pg1: unreachable: timed out",
        "pg3: no snapshot (unreachable?)",
    )
    assert [h.host for h in plan.hosts] == ["pg2"] and not plan.is_noop


def test_plan_build_unreachable_candidate_does_not_crash() -> None:
    snaps = {"pg1": converged("pg1", data_dir=EMPTY), "pg3": converged("pg3", data_dir=WITH_DATA)}
    plan = build(snaps, initialized=False)
    assert plan.bootstrap_on == "pg3"
    assert plan.refusals == ("pg2: no snapshot (unreachable?)",)


def test_plan_build_merges_layers_of_one_host() -> None:
    desired = [etcd_layer("pg1"), db_layer("pg1"), db_layer("pg2")]
    snaps = {"pg1": fresh("pg1"), "pg2": converged("pg2")}
    plan = plan_build(CLUSTER, desired, snaps, initialized=True, bootstrap_candidates=["pg1", "pg2"])
    assert [h.host for h in plan.hosts] == ["pg1", "pg2"]
    assert plan.for_host("pg1") == HostPlan(
        "pg1",
        install=("etcd-server", "etcd-client", "postgresql-15", "patroni"),
        files=(FileChange(MARKER_PATH, "create", False), FileChange(ETCD_ENV, "create", False),
               FileChange(PATRONI_YML, "create", True)),
        start=("etcd.service", "patroni.service"),
    )
    assert plan.for_host("pg2").is_noop


def test_plan_build_same_refusal_from_two_layers_listed_once() -> None:
    desired = [etcd_layer("pg1"), db_layer("pg1")]
    plan = plan_build(CLUSTER, desired, {"pg1": converged("pg1", hostname="other")}, initialized=True,
                      bootstrap_candidates=["pg1"])
    assert plan.refusals == ("pg1: answers as 'other'; the inventory address may point at another machine",)


@pytest.mark.parametrize(
    ("snapshots", "initialized", "is_noop"),
    [
        ({h: converged(h) for h in THREE}, True, True),
        ({h: converged(h) for h in THREE}, False, False),  # bootstrap pending
        ({**{h: converged(h) for h in THREE}, "pg2": converged("pg2", units={})}, True, False),
        ({"pg1": converged("pg1"), "pg2": converged("pg2")}, True, False),  # pg3 refused
    ],
    ids=["converged", "not-initialized", "unit-down", "unreachable"],
)
def test_build_plan_is_noop(snapshots: dict, initialized: bool, is_noop: bool) -> None:
    assert build(snapshots, initialized=initialized).is_noop is is_noop


def test_build_plan_rows() -> None:
    snaps = {"pg1": fresh("pg1"), "pg2": converged("pg2"), "pg3": converged("pg3", units={})}
    plan = build(snaps, initialized=False)
    assert plan.rows() == [
        {"host": "pg1", "plan": f"install postgresql-15, patroni; write {MARKER_PATH} (create), {PATRONI_YML} (create); "
                                "start patroni.service"},
        {"host": "pg2", "plan": "no change"},
        {"host": "pg3", "plan": "start patroni.service"},
        {"host": "pg2", "plan": "initialise the cluster here (first primary)"},
    ]


def test_build_plan_rows_without_bootstrap() -> None:
    plan = BuildPlan(hosts=(HostPlan("pg1"),))
    assert plan.rows() == [{"host": "pg1", "plan": "no change"}]
    assert plan.is_noop


# ------------------------------------------------------------------------------ plan_markdown


def secret_plan() -> BuildPlan:
    snaps = {"pg1": fresh("pg1"), "pg2": converged("pg2", files=files_with(PATRONI_YML, dataclasses.replace(
        PATRONI_STATE, sha256="2" * 64))), "pg3": converged("pg3")}
    return build(snaps, initialized=False)


@pytest.mark.parametrize("dry_run", [True, False])
def test_plan_markdown_has_no_file_contents(dry_run: bool) -> None:
    plan = secret_plan()
    md = plan_markdown("build_cluster", CLUSTER, plan, dry_run)
    assert SECRET not in md
    assert "password" not in md
    assert PATRONI_FILE.sha256 not in md
    for f in (MARKER, PATRONI_FILE, ETCD_FILE):
        assert f.content.strip() not in md
    assert f"`{PATRONI_YML}` (create, secret)" in md
    assert f"`{PATRONI_YML}` (update, secret)" in md
    assert f"`{MARKER_PATH}` (create)" in md


def test_plan_markdown_layout() -> None:
    md = plan_markdown("build_cluster", CLUSTER, secret_plan(), dry_run=True)
    lines = md.splitlines()
    assert lines[0] == "# build_cluster plan for cluster `lab`"
    assert "| host | install | write | start | restart | reload |" in lines
    assert "| pg3 | — | — | — | — | — |" in lines
    assert f"| pg2 | — | `{PATRONI_YML}` (update, secret) | — | — | patroni.service |" in lines
    assert (f"| pg1 | postgresql-15, patroni | `{MARKER_PATH}` (create)<br>`{PATRONI_YML}` (create, secret) "
            "| patroni.service | — | — |") in lines
    # pg2 and pg3 already hold data (converged): the first of them with data initialises
    assert "The cluster is not initialised yet: the HA manager on **pg2** initialises it." in lines
    assert lines[-1] == "_dry_run: nothing was changed._"
    assert md.endswith("\n")


def test_plan_markdown_refusals_and_noop() -> None:
    refused = BuildPlan(hosts=(HostPlan("pg1"),), refusals=("pg1: already belongs to cluster 'prod'",))
    md = plan_markdown("add_standby", CLUSTER, refused, dry_run=False)
    assert "**Refused — nothing will be changed:**" in md
    assert "- pg1: already belongs to cluster 'prod'" in md
    assert "no changes" not in md
    assert "_dry_run" not in md

    noop = BuildPlan(hosts=(HostPlan("pg1"),))
    md = plan_markdown("build_cluster", CLUSTER, noop, dry_run=False)
    assert "Every host already matches the inventory: **no changes**." in md
    assert "Refused" not in md


RELEASES = [
    ("patroni 3.0.2", (3, 0, 2)),
    ("patroni 4.0.7", (4, 0, 7)),
    ("patronictl version 3.3.8", (3, 3, 8)),
    ("4.1", (4, 1)),
    ("", None),
    (None, None),
    ("patroni: command not found", None),
]


@pytest.mark.parametrize(("text", "expected"), RELEASES, ids=[repr(r[0]) for r in RELEASES])
def test_parse_release(text, expected) -> None:
    assert parse_release(text) == expected


FLOOR_CASES = [
    ("patroni 3.0.2", True),
    ("patroni 3.0.3", False),
    ("patroni 3.1", False),
    ("patroni 3", False),  # one number is no dotted release: nothing known, nothing refused
    ("patroni 2.1.7", True),
    ("patroni 10.0.0", False),
    ("no version here", False),
]


@pytest.mark.parametrize(("text", "refused"), FLOOR_CASES, ids=[c[0] for c in FLOOR_CASES])
def test_release_problem(text: str, refused: bool) -> None:
    problem = release_problem("pg1", PATRONI_FLOOR, text)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith("pg1: patroni ") and "older than 3.0.3" in problem
