"""Every `is_*` step answers yes or no: a bool, or a frozen dataclass whose `ok: bool` is the answer
(its truth value) and whose other fields are the evidence. Where the evidence decides the answer
(refusals, a status, the backups listed), `ok` is derived from it and cannot be passed in."""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import pkgutil
import typing
from datetime import datetime, timezone

import pytest
from prefect import Task

import flows
import tasks
from tasks.adapters.backup.base import ArchiveCheck, BackupInfo
from tasks.adapters.ha.base import ClusterView, Member
from tasks.backup import Backups
from tasks.db_roles import LoginCheck
from tasks.etcd import EtcdCheck
from tasks.ha import InitCheck
from tasks.hosts import HostFacts
from tasks.restore import RestoreHost, SourceMarkers
from tasks.roles import FailoverCheck, SwitchoverCheck
from tasks.tls import CertificateCheck, CertificateRow

# Steps not yet held to the rule (none).
PENDING: set[str] = set()


def _steps() -> dict[str, Task]:
    found = {}
    for package in (flows, tasks):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, Task) and value.name.startswith("is_") and value.fn.__module__ == info.name:
                    found[f"{info.name}.{name}"] = value
    return found


STEPS = _steps()


def test_the_steps_are_found():
    names = {path.rsplit(".", 1)[1] for path in STEPS}
    assert {"is_host_ready", "is_host_reachable", "is_etcd_ours", "is_switchover_safe", "is_backup_present",
            "is_restore_host_free", "is_routing_correct"} <= names


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(reason="tasks/tab.py is reworked elsewhere")) if p in PENDING else p
    for p in sorted(STEPS)
])
def test_an_is_step_answers_yes_or_no(path):
    step = STEPS[path]
    answer = typing.get_type_hints(step.fn)["return"]
    if answer is bool:
        return
    assert dataclasses.is_dataclass(answer), f"{path} returns {answer}, neither a bool nor a dataclass"
    assert answer.__dataclass_params__.frozen, f"{answer.__name__} is not frozen"
    fields = {f.name: f for f in dataclasses.fields(answer)}
    assert "ok" in fields and typing.get_type_hints(answer)["ok"] is bool, f"{answer.__name__} has no ok: bool"
    # Its own or a shared base's (tasks.planning.plan.PlannedCheck), never object's default.
    assert any("__bool__" in vars(k) for k in answer.__mro__[:-1]), f"{answer.__name__} has no __bool__"
    assert len(fields) > 1, f"{answer.__name__} carries no evidence: return a bool"


def _cert(days_left: float | None) -> CertificateRow:
    return CertificateRow("pg1", "/var/lib/postgresql/tls/server.crt", "CN=pg1", "CN=lab CA", "", days_left)


def _backup(name: str, error: bool = False) -> BackupInfo:
    moment = datetime(2026, 11, 30, 2, tzinfo=timezone.utc)
    return BackupInfo(name=name, kind="full", start_time=moment, finish_time=moment, error=error)


# (answer, ok): answers whose ok follows from their evidence.
DERIVED = {
    "etcd: nothing refused": (EtcdCheck(), True),
    "etcd: foreign members": (EtcdCheck(("etcd: members ['x'] are not this cluster's",)), False),
    "login: works": (LoginCheck(()), True),
    "login: wrong password": (LoginCheck(("pg1: the superuser password in block 'lab' is wrong",)), False),
    "restore host: free": (RestoreHost("restore1", (), previous=False), True),
    "restore host: kept copy replaced": (RestoreHost("restore1", (), previous=True), True),
    "restore host: earlier drill": (RestoreHost("restore1", ("restore1: an earlier drill is still there",), True), False),
    "switchover: safe": (SwitchoverCheck("pg1", "pg2", (), 0.0, False), True),
    "switchover: already done": (SwitchoverCheck("pg2", "pg2", (), 0.0, True), True),
    "switchover: lagging candidate": (SwitchoverCheck("pg1", "pg2", ("candidate: pg2 lags",), 0.0, False), False),
    "failover: needed": (FailoverCheck(None, "pg2", (), False, "pg2 is the most advanced standby", 0), True),
    "failover: needed, a DBA decides": (FailoverCheck(None, "pg2", (), True, "may lose data", None), True),
    "failover: healthy primary": (FailoverCheck("pg1", None, ("a healthy primary exists",), False, "", None), False),
    "backups: none": (Backups(()), False),
    "backups: only a bad one": (Backups((_backup("b1", error=True),)), False),
    "backups: a good one": (Backups((_backup("b1", error=True), _backup("b2"))), True),
    "markers: none yet": (SourceMarkers([]), False),
    "markers: one": (SourceMarkers([["1", "2026-11-30 02:00:00+00"]]), True),
    "cluster: not initialised": (InitCheck(ClusterView(initialized=False)), False),
    "cluster: initialised": (InitCheck(ClusterView(True, (Member("pg1", "10.0.0.1", "primary", True),), "pg1")), True),
    "archive: OK": (ArchiveCheck(status="OK", detail="intact"), True),
    "archive: WARNING": (ArchiveCheck(status="WARNING", detail="a gap"), False),
    "archive: FAILURE": (ArchiveCheck(status="FAILURE", detail="not archived"), False),
    "certificates: far from expiry": (CertificateCheck("pg1", 21, (_cert(90.0),)), True),
    "certificates: one within the alarm": (CertificateCheck("pg1", 21, (_cert(90.0), _cert(20.5))), False),
    "certificates: not installed yet": (CertificateCheck("pg1", 21, (_cert(None),)), True),
    "certificates: TLS off, none to check": (CertificateCheck("pg1", 21), True),
}


@pytest.mark.parametrize("answer, ok", DERIVED.values(), ids=DERIVED.keys())
def test_ok_follows_from_the_evidence(answer, ok):
    assert answer.ok is ok and bool(answer) is ok
    assert "ok" not in {f.name for f in dataclasses.fields(answer) if f.init}, "ok is derived, never passed in"
    assert pickle.loads(pickle.dumps(answer)) == answer  # task and flow results are persisted


def test_a_changed_answer_is_derived_again():
    refused = dataclasses.replace(SwitchoverCheck("pg1", "pg2", (), 0.0, False), refusals=("candidate: pg2 lags",))
    assert refused.ok is False
    assert dataclasses.replace(ArchiveCheck(status="FAILURE", detail=""), status="OK").ok is True


def test_host_facts_row_keeps_the_reachable_column():
    row = HostFacts(host="pg1", address="10.0.0.1", ok=False, error="timed out").row()
    assert list(row)[:3] == ["host", "address", "reachable"] and row["reachable"] is False
    assert "ok" not in row and row["error"] == "timed out"
    assert not HostFacts(host="pg1", address="10.0.0.1", ok=False)
