"""tasks/locks.py and the etcd mutex under it (tasks/adapters/etcd.py EtcdMutex), without etcd or Prefect.

EtcdMutex takes its Etcd as an argument, so it runs here against FakeEtcd: an in-memory keyspace
with create revisions and leases, the part of etcd that concurrency.Mutex relies on. Its poll
sleeps go to a FakeTime. cluster_lock and pgquartz_lock build their collaborators themselves (no
injectable seam), so those tests replace the module's own names (monkeypatch, as
test_etcd_leader_away does): Prefect's limit calls, the context and the Etcd class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from etcd3gw import exceptions as etcd_exc
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError

import tasks.adapters.etcd as etcd_adapter
from blocks.inventory import parse_inventory
from tasks import locks
from tasks.adapters.etcd import EtcdMutex, EtcdUnavailable, LockKeyTaken, LockTimeout
from tasks.pgquartz import Job, parse_job

PATIENCE = 30.0  # the longest a test waits for the keepalive thread; only a broken test gets near it
PREFIX = "/bouwsteen/locks/lab/"
LEASE_BASE = 0x694D7F1A2B3C0000


# --------------------------------------------------------------------------- fakes


class FakeLease:
    def __init__(self, server: FakeServer, lease_id: int, ttl: int) -> None:
        self.server = server
        self.id = lease_id
        self.ttl = ttl

    def refresh(self) -> None:
        self.server.refresh(self.id)

    def revoke(self) -> None:
        self.server.revoke(self.id)


class FakeServer:
    """etcd's keyspace as the Mutex protocol sees it: each key has a create revision and a lease."""

    def __init__(self) -> None:
        self.revision = 0
        self.keys: dict[str, tuple[bytes, int, int | None]] = {}  # key -> (value, create revision, lease)
        self.leases: dict[int, FakeLease] = {}
        self.revoked: list[int] = []
        self.refreshed: Counter[int] = Counter()
        self.refresh_seen = threading.Event()
        self.failing_refreshes = 0  # the next n refreshes fail as if etcd were unreachable
        self.failing_revokes = 0
        self._lock = threading.Lock()

    # the calls the gateway client makes
    def lease(self, ttl: int) -> FakeLease:
        lease = FakeLease(self, LEASE_BASE + len(self.leases) + 1, ttl)
        self.leases[lease.id] = lease
        return lease

    def create(self, key: str, value: str, lease: FakeLease | None = None) -> bool:
        if key in self.keys:
            return False
        self.revision += 1
        self.keys[key] = (value.encode(), self.revision, lease.id if lease else None)
        return True

    def get_prefix(self, prefix: str, sort_order: str | None = None,
                   sort_target: str | None = None) -> list[tuple[bytes, dict[str, Any]]]:
        rows = [(value, {"key": key.encode(), "create_revision": str(rev)})
                for key, (value, rev, _) in self.keys.items() if key.startswith(prefix)]
        if (sort_order, sort_target) == ("ascend", "create"):
            rows.sort(key=lambda row: int(row[1]["create_revision"]))
        return rows

    def refresh(self, lease_id: int) -> None:
        with self._lock:
            if self.failing_refreshes:
                self.failing_refreshes -= 1
                raise etcd_exc.ConnectionFailedError("etcd unreachable")
            self.refreshed[lease_id] += 1
        self.refresh_seen.set()

    def revoke(self, lease_id: int) -> None:
        if self.failing_revokes:
            self.failing_revokes -= 1
            raise etcd_exc.ConnectionFailedError("etcd unreachable")
        self.revoked.append(lease_id)
        self.keys = {k: v for k, v in self.keys.items() if v[2] != lease_id}

    # set-up helpers
    def holder(self, key: str, value: str) -> FakeLease:
        """Someone else (another runbook, a cron-run pgquartz) waits for or holds the lock."""
        lease = self.lease(60)
        assert self.create(key, value, lease=lease)
        return lease


class FakeEtcd:
    """The one Etcd method EtcdMutex uses, `_call(what, fn)`, on a FakeServer."""

    def __init__(self, server: FakeServer, *, down: set[str] | None = None,
                 after: dict[str, Callable[[], None]] | None = None) -> None:
        self.server = server
        self.down = down or set()  # calls (by `what`) that find no endpoint answering
        self.after = after or {}  # what happens on the server right after a call
        self.calls: list[str] = []

    def _call(self, what: str, fn: Callable[[FakeServer], Any]) -> Any:
        self.calls.append(what)
        if what in self.down:
            raise EtcdUnavailable(f"etcd {what}: no endpoint answered (fake)")
        result = fn(self.server)
        if what in self.after:
            self.after.pop(what)()
        return result

    def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "") -> EtcdMutex:
        return EtcdMutex(self, prefix, ttl=ttl, holder=holder)  # type: ignore[arg-type]


class FakeTime:
    """tasks.adapters.etcd's clock: sleeping moves it on; on_sleep[n] runs during the n-th sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: dict[int, Callable[[], None]] = {}

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        hook = self.on_sleep.pop(len(self.sleeps), None)
        if hook is not None:
            hook()


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr(etcd_adapter, "time", clock)
    return clock


@pytest.fixture
def server() -> Iterator[FakeServer]:
    yield FakeServer()


def ours(server: FakeServer, mutex: EtcdMutex) -> bool:
    return mutex.key is not None and mutex.key in server.keys


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("cluster", "name"), [("lab", "cluster-lab"), ("site-a", "cluster-site-a")])
def test_the_prefect_limit_is_named_after_the_cluster(cluster: str, name: str) -> None:
    assert locks.limit_name(cluster) == name


INV = parse_inventory({
    "cluster": {"name": "lab", "network": "10.0.0.0/24"},
    "hosts": [{"name": n, "address": a, "roles": ["db"]} for n, a in
              [("pg1", "10.0.0.11"), ("pg2", "10.0.0.12"), ("pg3", "10.0.0.13")]],
})


def test_the_etcd_lock_lives_under_the_clusters_etcd_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    custom = parse_inventory({**INV.model_dump(mode="json"),
                              "cluster": {**INV.model_dump(mode="json")["cluster"], "etcd": {"prefix": "/site-a"}}})
    inventories = {"lab": INV, "other": custom}
    monkeypatch.setattr(locks, "context_for", lambda cluster: SimpleNamespace(inventory=inventories[cluster]))
    assert locks.etcd_lock_prefix("lab") == PREFIX
    # The trailing "/" keeps cluster "lab" from sharing keys with a cluster "lab2".
    assert locks.etcd_lock_prefix("other") == "/site-a/locks/other/"


# --------------------------------------------------------------------------- EtcdMutex: the protocol


def test_a_mutex_prefix_must_end_with_a_slash(server: FakeServer) -> None:
    with pytest.raises(ValueError, match="ends with '/'"):
        EtcdMutex(FakeEtcd(server), "/bouwsteen/locks/lab")  # type: ignore[arg-type]


def test_the_key_is_the_prefix_and_the_lease_id_in_hex(server: FakeServer, fake_time: FakeTime) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=30, holder="switchover on w1 pid 7")
    mutex.acquire(timeout=1)
    try:
        (lease_id,) = server.leases
        assert mutex.key == f"{PREFIX}{lease_id:x}"  # concurrency.Mutex's (and pgquartz's) key scheme
        assert server.keys[mutex.key][0] == b"switchover on w1 pid 7"
        assert server.keys[mutex.key][2] == lease_id  # the key lives and dies with the lease
        assert server.leases[lease_id].ttl == 30
        assert fake_time.sleeps == []  # alone: owned at once
    finally:
        mutex.release()


# Keys other clients hold under the prefix: (key, created before ours?). The one with the lowest
# create revision owns the lock, whatever the key's name sorts like.
OWNER_CASES = {
    "alone": ([], True),
    "a later waiter, smaller key": ([("0", False)], True),
    "a later waiter, bigger key": ([("ffffffffffffffff", False)], True),
    "an earlier holder, bigger key": ([("ffffffffffffffff", True)], False),
    "an earlier holder, smaller key": ([("0", True)], False),
    "earlier and later": ([("1", True), ("0", False)], False),
    "another prefix only": ([("/bouwsteen/locks/lab2/1", True)], True),
}


@pytest.mark.parametrize(("others", "owns"), OWNER_CASES.values(), ids=OWNER_CASES.keys())
def test_the_lowest_create_revision_owns(server: FakeServer, fake_time: FakeTime,
                                        others: list[tuple[str, bool]], owns: bool) -> None:
    def key(name: str) -> str:
        return name if name.startswith("/") else PREFIX + name

    for name, before in others:
        if before:
            server.holder(key(name), f"holder {name}")

    def later_waiters() -> None:
        for name, before in others:
            if not before:
                server.holder(key(name), f"waiter {name}")

    etcd = FakeEtcd(server, after={"lock create": later_waiters})
    mutex = etcd.mutex(PREFIX, holder="us")
    if owns:
        mutex.acquire(timeout=5)
        assert fake_time.sleeps == []
        assert ours(server, mutex)
        mutex.release()
    else:
        with pytest.raises(LockTimeout):
            mutex.acquire(timeout=5)
    assert "lock read" in etcd.calls


def test_a_waiter_takes_the_lock_when_the_holder_lets_go(server: FakeServer, fake_time: FakeTime) -> None:
    earlier = server.holder(PREFIX + "ffff", "scheduled_basebackup on w2 pid 9")
    fake_time.on_sleep[3] = earlier.revoke  # the holder finishes during our third poll pause
    mutex = FakeEtcd(server).mutex(PREFIX, holder="switchover")
    mutex.acquire(timeout=60)
    try:
        assert fake_time.sleeps == [0.5, 0.5, 0.5]
        assert ours(server, mutex)
        assert list(server.keys) == [mutex.key]
    finally:
        mutex.release()


@pytest.mark.parametrize(
    ("holder_value", "named"),
    [
        ("pgquartz on cron1", "pgquartz on cron1"),
        ("", PREFIX + "ffff"),  # a holder that wrote no value is named by its key
    ],
    ids=["by-value", "by-key"],
)
def test_a_waiter_gives_up_at_its_timeout_and_leaves_no_key(server: FakeServer, fake_time: FakeTime,
                                                           holder_value: str, named: str) -> None:
    server.holder(PREFIX + "ffff", holder_value)
    mutex = FakeEtcd(server).mutex(PREFIX, holder="switchover")
    started = fake_time.now
    with pytest.raises(LockTimeout) as raised:
        mutex.acquire(timeout=2)
    assert str(raised.value) == f"lock {PREFIX} still held by {named} after 2s"
    assert fake_time.now - started > 2  # it polled until the deadline had passed, then stopped
    assert fake_time.sleeps == [0.5] * 5
    # Its own waiting key is gone (lease revoked), or every later waiter would queue behind it.
    assert list(server.keys) == [PREFIX + "ffff"]
    assert mutex.key is None


def test_a_taken_key_is_refused(server: FakeServer, fake_time: FakeTime) -> None:
    server.create(f"{PREFIX}{LEASE_BASE + 1:x}", "someone else")  # the key our first lease maps to
    mutex = FakeEtcd(server).mutex(PREFIX)
    with pytest.raises(LockKeyTaken, match="already exists"):
        mutex.acquire(timeout=1)
    assert server.keys[f"{PREFIX}{LEASE_BASE + 1:x}"][0] == b"someone else"  # not taken over


@pytest.mark.parametrize("down", ["lease grant", "lock create"])
def test_etcd_not_answering_before_the_key_exists_is_unavailable(server: FakeServer, fake_time: FakeTime,
                                                                 down: str) -> None:
    mutex = FakeEtcd(server, down={down}).mutex(PREFIX)
    with pytest.raises(EtcdUnavailable, match=down):
        mutex.acquire(timeout=1)
    assert server.keys == {}


def test_etcd_failing_while_waiting_leaves_no_key_behind(server: FakeServer, fake_time: FakeTime) -> None:
    etcd = FakeEtcd(server, down={"lock read"})
    mutex = etcd.mutex(PREFIX, ttl=1)
    try:
        with pytest.raises(EtcdUnavailable):
            mutex.acquire(timeout=5)
        # cluster_lock then goes on with the Prefect lock only and never releases this mutex.
        assert server.keys == {}
    finally:
        mutex.release()


# --------------------------------------------------------------------------- EtcdMutex: the lease


def test_release_revokes_the_lease_and_may_be_repeated(server: FakeServer, fake_time: FakeTime) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX)
    mutex.acquire(timeout=1)
    lease_id = server.keys[mutex.key][2]  # type: ignore[index]
    mutex.release()
    assert server.revoked == [lease_id] and server.keys == {} and mutex.key is None
    mutex.release()  # nothing left to revoke
    assert server.revoked == [lease_id]


def test_release_survives_etcd_not_answering(server: FakeServer, fake_time: FakeTime) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX)
    mutex.acquire(timeout=1)
    server.failing_revokes = 1
    mutex.release()  # the lease then expires by itself after its ttl
    assert mutex.key is None and server.revoked == []


def test_the_context_manager_releases(server: FakeServer, fake_time: FakeTime) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX)
    mutex.acquire(timeout=1)
    with pytest.raises(KeyError), mutex:
        raise KeyError("the runbook failed")
    assert server.keys == {} and mutex.key is None


def test_the_lease_is_kept_alive_while_held_and_no_longer(server: FakeServer, fake_time: FakeTime) -> None:
    # Real thread: it refreshes every ttl/3 (0.01 s here); the test waits for events, not for time.
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=0.03)  # type: ignore[arg-type]
    server.failing_refreshes = 2  # a missed refresh is survivable: it tries again next time
    mutex.acquire(timeout=1)
    thread = mutex._keepalive
    assert thread is not None and thread.daemon
    try:
        lease_id = server.keys[mutex.key][2]  # type: ignore[index]
        assert server.refresh_seen.wait(PATIENCE), "the lease was never refreshed"
        assert server.refreshed[lease_id] >= 1 and server.failing_refreshes == 0
    finally:
        mutex.release()
    thread.join(PATIENCE)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- cluster_lock


class Harness:
    """cluster_lock's collaborators, replaced: Prefect's limit, the context and etcd."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
        self.server = server
        self.limit_busy = False
        self.limit_times_out = False
        self.etcd_down: set[str] = set()
        self.ensured: list[str] = []
        self.asked_in_use: list[str] = []
        self.concurrency_calls: list[tuple[str, dict[str, Any]]] = []
        self.etcds: list[tuple[list[str], float]] = []
        self.mutexes: list[EtcdMutex] = []
        self.in_limit = False
        harness = self

        @contextlib.contextmanager
        def concurrency(name: str, **kwargs: Any) -> Iterator[None]:
            harness.concurrency_calls.append((name, kwargs))
            if harness.limit_times_out:
                raise AcquireConcurrencySlotTimeoutError(f"Attempt to acquire slots timed out after {kwargs}")
            harness.in_limit = True
            try:
                yield
            finally:
                harness.in_limit = False

        class Etcd(FakeEtcd):
            def __init__(self, endpoints: list[str], *, timeout: float) -> None:
                harness.etcds.append((endpoints, timeout))
                super().__init__(harness.server, down=harness.etcd_down)

            def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "") -> EtcdMutex:
                mutex = super().mutex(prefix, ttl=ttl, holder=holder)
                harness.mutexes.append(mutex)
                return mutex

        monkeypatch.setattr(locks, "get_run_logger", lambda: logging.getLogger("tests.locks"))
        monkeypatch.setattr(locks, "ensure_cluster_limit", self.ensured.append)
        monkeypatch.setattr(locks, "limit_in_use", lambda cluster: self.asked_in_use.append(cluster) or self.limit_busy)
        monkeypatch.setattr(locks, "concurrency", concurrency)
        monkeypatch.setattr(locks, "context_for", lambda cluster: SimpleNamespace(inventory=INV))
        monkeypatch.setattr(locks, "Etcd", Etcd)


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch, server: FakeServer, fake_time: FakeTime) -> Iterator[Harness]:
    h = Harness(monkeypatch, server)
    yield h
    for mutex in h.mutexes:
        mutex.release()  # stop any keepalive thread a failing case left behind


BUSY_LIMIT = "cluster lab is busy: another runbook holds Prefect limit cluster-lab"

# (what the world looks like, wait_seconds, require_etcd) -> (body ran, error type, message, etcd key held in the body)
CLUSTER_LOCK_CASES = {
    "free": ({}, 0, False, (True, None, None, True)),
    "free, waiting allowed": ({}, 120, False, (True, None, None, True)),
    "limit taken, no waiting": ({"limit_busy": True}, 0, False, (False, locks.ClusterBusy, BUSY_LIMIT, False)),
    # With waiting allowed the limit is not peeked at: Prefect's acquire waits for it.
    "limit taken, waiting allowed": ({"limit_busy": True}, 120, False, (True, None, None, True)),
    "limit stays taken": ({"limit_times_out": True}, 120, False, (False, locks.ClusterBusy, BUSY_LIMIT, False)),
    "etcd lock held outside Prefect": ({"etcd_holder": "pgquartz on cron1"}, 0, False,
                                       (False, locks.ClusterBusy,
                                        f"cluster lab is busy: lock {PREFIX} still held by pgquartz on cron1 after 1s",
                                        False)),
    "etcd down": ({"etcd_down": {"lease grant"}}, 0, False, (True, None, None, False)),
    "etcd down, etcd required": ({"etcd_down": {"lease grant"}}, 0, True,
                                 (False, EtcdUnavailable, "etcd lease grant: no endpoint answered", False)),
}


@pytest.mark.parametrize(("world", "wait_seconds", "require_etcd", "expected"), CLUSTER_LOCK_CASES.values(),
                         ids=CLUSTER_LOCK_CASES.keys())
def test_cluster_lock(harness: Harness, world: dict[str, Any], wait_seconds: float, require_etcd: bool,
                      expected: tuple[bool, type[BaseException] | None, str | None, bool],
                      caplog: pytest.LogCaptureFixture) -> None:
    ran, error, message, etcd_held = expected
    harness.limit_busy = world.get("limit_busy", False)
    harness.limit_times_out = world.get("limit_times_out", False)
    harness.etcd_down |= world.get("etcd_down", set())
    if "etcd_holder" in world:
        harness.server.holder(PREFIX + "ffff", world["etcd_holder"])
    seen: dict[str, Any] = {}

    def body() -> None:
        with locks.cluster_lock("lab", "switchover", wait_seconds=wait_seconds, require_etcd=require_etcd):
            seen["in_limit"] = harness.in_limit
            seen["etcd_held"] = any(ours(harness.server, m) for m in harness.mutexes)

    with caplog.at_level(logging.INFO, logger="tests.locks"):
        if error is None:
            body()
        else:
            with pytest.raises(error) as raised:
                body()
            assert str(raised.value).startswith(message)  # type: ignore[arg-type]

    assert harness.ensured == ["lab"]  # the limit is created before anything else
    assert ("in_limit" in seen) is ran
    if ran:
        assert seen == {"in_limit": True, "etcd_held": etcd_held}
        assert "Holding the lock on cluster lab for switchover." in caplog.messages
    etcd_warned = "etcd does not answer yet; holding only the Prefect lock for cluster lab." in caplog.messages
    assert etcd_warned is (ran and not etcd_held)
    # Whatever happened, nothing of ours is left in etcd and the Prefect slot is given back.
    assert [k for k in harness.server.keys if k != PREFIX + "ffff"] == []
    assert harness.in_limit is False


@pytest.mark.parametrize(("wait_seconds", "limit_timeout", "etcd_timeout"), [(0, 30, 1), (120, 120, 120), (0.5, 30, 1)])
def test_cluster_lock_asks_for_what_it_waits(harness: Harness, wait_seconds: float, limit_timeout: float,
                                             etcd_timeout: float, fake_time: FakeTime) -> None:
    harness.server.holder(PREFIX + "ffff", "someone")  # so the etcd wait runs to its timeout
    started = fake_time.now
    with pytest.raises(locks.ClusterBusy), locks.cluster_lock("lab", "build_cluster", wait_seconds=wait_seconds):
        pass
    assert harness.asked_in_use == (["lab"] if wait_seconds <= 0 else [])
    assert harness.concurrency_calls == [("cluster-lab", {"occupy": 1, "strict": True, "timeout_seconds": limit_timeout,
                                                          "lease_duration": 60})]
    assert harness.etcds == [(["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"], 3)]
    (mutex,) = harness.mutexes
    assert (mutex.prefix, mutex.ttl) == (PREFIX, locks.LEASE_TTL)
    assert mutex.holder == f"build_cluster on {socket.gethostname()} pid {os.getpid()}"
    assert etcd_timeout < fake_time.now - started <= etcd_timeout + 0.5  # fake seconds: one poll past the timeout


def test_cluster_lock_releases_etcd_when_the_runbook_fails(harness: Harness) -> None:
    with pytest.raises(ValueError, match="promote failed"), locks.cluster_lock("lab", "failover"):
        assert len(harness.server.keys) == 1
        raise ValueError("promote failed")
    assert harness.server.keys == {} and harness.in_limit is False


def test_a_timeout_inside_the_runbook_is_not_reported_as_a_busy_cluster(harness: Harness) -> None:
    with pytest.raises(TimeoutError), locks.cluster_lock("lab", "restore_drill"):
        raise TimeoutError("Task run exceeded timeout of 60 second(s)")


# --------------------------------------------------------------------------- pgquartz_lock


def job(name: str = "purge_audit_log", lock_timeout: float = 5, endpoints: list[str] | None = None) -> Job:
    etcd: dict[str, Any] = {"lockTimeout": f"{lock_timeout}s"}
    if endpoints is not None:
        etcd["endpoints"] = endpoints
    return parse_job({"parallel": 1, "etcdConfig": etcd, "steps": {"s": {"commands": [{"type": "shell", "inline": "true"}]}}},
                     source=Path(f"/jobs/{name}.yml"))


def test_pgquartz_lock_holds_the_jobs_own_prefix(harness: Harness, fake_time: FakeTime) -> None:
    with locks.pgquartz_lock("lab", job(), "tab_job run 42"):
        ((key, (value, _, _)),) = harness.server.keys.items()
        assert key.startswith("/pgquartz/purge_audit_log/")
        assert value == f"tab_job run 42 on {socket.gethostname()} pid {os.getpid()}".encode()
        assert harness.in_limit is False  # no Prefect limit: the job changes data, not the cluster
    (mutex,) = harness.mutexes
    assert mutex.ttl == locks.PGQUARTZ_LEASE_TTL
    assert harness.server.keys == {}
    assert harness.ensured == [] and harness.concurrency_calls == []


def test_pgquartz_lock_refuses_a_job_held_by_cron_after_its_lock_timeout(harness: Harness, fake_time: FakeTime) -> None:
    harness.server.holder("/pgquartz/purge_audit_log/ffff", "pgquartz on cron1")
    started = fake_time.now
    with pytest.raises(locks.JobFailed) as raised, locks.pgquartz_lock("lab", job(lock_timeout=3), "tab_job"):
        raise AssertionError("must not run")
    assert str(raised.value) == "job purge_audit_log: lock /pgquartz/purge_audit_log/ still held by pgquartz on cron1 after 3s"
    assert 3 < fake_time.now - started <= 3.5
    assert list(harness.server.keys) == ["/pgquartz/purge_audit_log/ffff"]


def test_pgquartz_lock_needs_etcd(harness: Harness) -> None:
    harness.etcd_down.add("lease grant")
    # Unlike the cluster lock, no fallback: it is the job's only lock.
    with pytest.raises(EtcdUnavailable), locks.pgquartz_lock("lab", job(), "tab_job"):
        raise AssertionError("must not run")


def test_pgquartz_lock_releases_when_the_job_fails(harness: Harness) -> None:
    with pytest.raises(RuntimeError, match="step failed"), locks.pgquartz_lock("lab", job(), "tab_job"):
        raise RuntimeError("step failed")
    assert harness.server.keys == {}


CLUSTER_ETCD = ["10.0.0.11:2379", "10.0.0.12:2379", "10.0.0.13:2379"]


@pytest.mark.parametrize(("endpoints", "used"), [
    (None, CLUSTER_ETCD),  # not in the job file: the cluster's etcd
    ([], CLUSTER_ETCD),  # pgquartz reads an empty list as "not given" too
    (["etcd-a:2379", "http://etcd-b:2379"], ["etcd-a:2379", "etcd-b:2379"]),  # the job's own etcd, scheme dropped
    # pgquartz's default, written out (the lab job does): the node's own member = the cluster's members
    (["localhost:2379"], CLUSTER_ETCD),
], ids=["not given", "empty", "own etcd", "localhost"])
def test_pgquartz_lock_uses_the_jobs_etcd_when_it_names_one(harness: Harness, endpoints: list[str] | None,
                                                            used: list[str]) -> None:
    with locks.pgquartz_lock("lab", job(endpoints=endpoints), "tab_job"):
        pass
    assert harness.etcds == [(used, 3)]
