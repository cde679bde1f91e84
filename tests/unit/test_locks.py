"""tasks/locks.py and the etcd mutex under it (tasks/adapters/etcd.py EtcdMutex), without etcd or Prefect.

EtcdMutex takes its Etcd as an argument, so it runs here against FakeEtcd: an in-memory keyspace
with create revisions and leases, the part of etcd that concurrency.Mutex relies on. Its poll
sleeps go to a FakeTime. cluster_lock and pgquartz_lock build their collaborators themselves (no
injectable seam), so those tests replace the module's own names (monkeypatch, as
test_etcd_leader_away does): Prefect's limit calls, the context and the Etcd class.

Losing a held lock is tested one keep-alive round at a time (`EtcdMutex.renew()`, on the fake
clock): the keep-alive thread itself waits ttl/3 of real time, so with the TTLs used here it never
runs a round during a test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
import threading
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from etcd3gw import exceptions as etcd_exc
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError
from prefect.states import Failed
from prefect.utilities.callables import get_call_parameters

import tasks.adapters.etcd as etcd_adapter
from blocks.inventory import parse_inventory
from flows.runbook import POLICIES, holding
from tasks import locks, lockwatch, runtime
from tasks.adapters.etcd import EtcdMutex, EtcdUnavailable, LockKeyTaken, LockTimeout
from tasks.adapters.etcd_config import client_endpoints
from tasks.errors import LockLost, LockUnavailable
from tasks.pgquartz import Job, JobFileError, parse_job
from tasks.runtime import step

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
        self.dead: set[int] = set()  # leases revoked or expired
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
        # As etcd's JSON gateway answers: int64s as strings, a zero lease (none) left out.
        rows = [(value, {"key": key.encode(), "create_revision": str(rev), **({"lease": str(lease)} if lease else {})})
                for key, (value, rev, lease) in self.keys.items() if key.startswith(prefix)]
        if (sort_order, sort_target) == ("ascend", "create"):
            rows.sort(key=lambda row: int(row[1]["create_revision"]))
        return rows

    def refresh(self, lease_id: int) -> int:
        with self._lock:
            if self.failing_refreshes:
                self.failing_refreshes -= 1
                raise etcd_exc.ConnectionFailedError("etcd unreachable")
            self.refreshed[lease_id] += 1
        self.refresh_seen.set()
        return -1 if lease_id in self.dead else max(int(self.leases[lease_id].ttl), 1)

    def revoke(self, lease_id: int) -> None:
        if self.failing_revokes:
            self.failing_revokes -= 1
            raise etcd_exc.ConnectionFailedError("etcd unreachable")
        self.revoked.append(lease_id)
        self.expire(lease_id)

    # the gateway's HTTP calls that etcd3gw's Lease makes on a client (keep-alive)
    def get_url(self, path: str) -> str:
        return path

    def post(self, url: str, json: dict[str, Any]) -> dict[str, Any]:
        assert url == "/lease/keepalive", url
        ttl = self.refresh(int(json["ID"]))
        return {"result": {"ID": str(json["ID"]), "TTL": str(ttl)} if ttl > 0 else {"ID": str(json["ID"])}}

    # what happens to a lock behind its holder's back
    def expire(self, lease_id: int) -> None:
        """The lease runs out (or `etcdctl lease revoke`): it and its keys are gone."""
        self.dead.add(lease_id)
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

    def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "", label: str = "") -> EtcdMutex:
        return EtcdMutex(self, prefix, ttl=ttl, holder=holder, label=label)  # type: ignore[arg-type]


class FakeTime:
    """tasks.adapters.etcd's clock: sleeping moves it on; on_sleep[n] runs during the n-th sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: dict[int, Callable[[], None]] = {}

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        """The wall clock, moving with the monotonic one: fake second 1000 is 2027-01-15 08:00:00 UTC."""
        return 1_800_000_000 + (self.now - 1000.0)

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


def test_a_keepalive_round_while_waiting_in_line_is_no_loss(server: FakeServer, fake_time: FakeTime) -> None:
    # A run killed mid-job leaves its key until its lease ends (≤ 60 s); the rerun waits behind it
    # longer than one keep-alive interval (ttl/3), and that renewal must not call the wait a loss.
    earlier = server.holder(PREFIX + "ffff", "tab_job killed on w1 pid 7")
    mutex = FakeEtcd(server).mutex(PREFIX, holder="tab_job rerun")
    fake_time.on_sleep[1] = mutex.renew
    fake_time.on_sleep[3] = earlier.revoke
    mutex.acquire(timeout=60)
    try:
        assert ours(server, mutex)
        mutex.require()
        mutex.renew()  # once held, the ordinary round finds it ours
        assert not mutex.lost.is_set()
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
        # cluster_lock then refuses (LockUnavailable) and never releases this mutex.
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


# --------------------------------------------------------------------------- EtcdMutex: noticing the loss


def at(second: float) -> str:
    """The fake wall clock's time at fake second `second` after acquiring (acquired at 08:00:00)."""
    return etcd_adapter.utc_text(1_800_000_000 + second)


def key_of(mutex: EtcdMutex) -> str:
    assert mutex.key is not None
    return mutex.key


# What happens to a lock held with a 30 s lease (renewed every 10 s), in order: ("pass", s) the
# fake clock moves on; "renew" is one keep-alive round; ("etcd down", n): the next n renewals find
# no endpoint; the rest is what etcd or another client does behind the holder's back. Then a
# changing step asks: still held (None), or LockLost (what its reason says, when it was lost).
LOSS_CASES: dict[str, tuple[list[Any], tuple[str, str] | None]] = {
    "renewed in time": ([("pass", 10), "renew", ("pass", 10), "renew", ("pass", 25)], None),
    "one renewal missed": ([("etcd down", 1), ("pass", 10), "renew", ("pass", 10), "renew", ("pass", 25)], None),
    "lease expired": ([("pass", 10), "expire", "renew"],
                      (r"etcd says lease [0-9a-f]+ has expired \(keep-alive TTL -1\)", at(10))),
    "lease revoked from outside": ([("pass", 12), "revoke", "renew"], (r"lease [0-9a-f]+ has expired", at(12))),
    # Renewals that keep failing: lost when the lease's TTL has passed since etcd last confirmed it.
    "renewals fail past the TTL": ([("etcd down", 3), ("pass", 10), "renew", ("pass", 10), "renew",
                                    ("pass", 10), "renew"],
                                   (r"etcd has not confirmed lease [0-9a-f]+ within its 30 s TTL \(renewed every 10 s\) "
                                    r"\(last error: etcd unreachable\), so etcd has let the lock go or will", at(30))),
    "renewals fail past the TTL after one renewal": ([("pass", 10), "renew", ("etcd down", 9), ("pass", 10), "renew",
                                                      ("pass", 10), "renew", ("pass", 10), "renew"],
                                                     (r"within its 30 s TTL", at(40))),
    # However stuck the keep-alive is, a step never acts on a lease etcd may have dropped.
    "no renewal at all": ([("pass", 30)], (r"etcd has not confirmed lease [0-9a-f]+ within its 30 s TTL \(renewed "
                                           r"every 10 s\), so", at(30))),
    "key deleted": ([("pass", 10), "delete key", "renew"],
                    (r"its key /bouwsteen/locks/lab/[0-9a-f]+ is gone from etcd$", at(10))),
    "key taken by someone else": ([("pass", 10), "delete key", "other holder", "renew"],
                                  (r"is gone from etcd \(now held by switchover on w9 pid 3\)", at(10))),
    "key overwritten": ([("pass", 10), "overwrite", "renew"],
                        (r"its key \S+ was overwritten: it says 'switchover on w9 pid 3'", at(10))),
    "key detached from its lease": ([("pass", 10), "detach", "renew"],
                                    (r"its key \S+ is no longer attached to lease [0-9a-f]+", at(10))),
}


def play(server: FakeServer, fake_time: FakeTime, mutex: EtcdMutex, events: list[Any]) -> None:
    key = key_of(mutex)
    lease_id = server.keys[key][2]
    assert lease_id is not None
    for event in events:
        name, arg = (event, None) if isinstance(event, str) else event
        if name == "pass":
            fake_time.now += arg
        elif name == "renew":
            mutex.renew()
        elif name == "etcd down":
            server.failing_refreshes = arg
        elif name == "expire":
            server.expire(lease_id)
        elif name == "revoke":
            server.revoke(lease_id)
        elif name == "delete key":
            del server.keys[key]
        elif name == "other holder":
            server.holder(PREFIX + "ffff", "switchover on w9 pid 3")
        elif name == "overwrite":
            _, revision, lease = server.keys[key]
            server.keys[key] = (b"switchover on w9 pid 3", revision, lease)
        elif name == "detach":  # etcdctl put without --lease: the key outlives our lease
            value, revision, _ = server.keys[key]
            server.keys[key] = (value, revision, None)
        else:
            raise AssertionError(name)


@pytest.mark.parametrize(("events", "lost"), LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_a_held_lock_notices_its_loss(server: FakeServer, fake_time: FakeTime, events: list[Any],
                                      lost: tuple[str, str] | None) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=30, holder="build_cluster on w1 pid 7", label="the cluster lock of lab")
    mutex.acquire(timeout=1)
    try:
        key = key_of(mutex)
        play(server, fake_time, mutex, events)
        if lost is None:
            mutex.require()
            assert not mutex.lost.is_set()
            return
        reason, when = lost
        for _ in range(2):  # and again at every later step: a lost lock stays lost
            with pytest.raises(LockLost) as raised:
                mutex.require()
            assert raised.value.lock == f"the cluster lock of lab (etcd key {key})"
            assert re.search(reason, raised.value.reason), raised.value.reason
            assert raised.value.lost_at == when
            assert str(raised.value).startswith(f"lost the cluster lock of lab (etcd key {key}) at {when}: ")
            assert str(raised.value).endswith("stopped before the next change (another holder may be acting now: "
                                              "look at what ran before running again)")
        assert mutex.lost.is_set()
    finally:
        mutex.release()


def test_a_lost_lock_survives_pickling(server: FakeServer, fake_time: FakeTime) -> None:
    # Prefect persists a failed run's exception.
    lost = LockLost("the pgquartz lock of job purge (etcd key /pgquartz/purge/1)", at(3), "lease 1 has expired")
    again = pickle.loads(pickle.dumps(lost))
    assert (type(again), str(again), again.lock, again.lost_at, again.reason) == (
        LockLost, str(lost), lost.lock, lost.lost_at, lost.reason)


def test_the_keepalive_thread_notices_an_expired_lease(server: FakeServer, fake_time: FakeTime) -> None:
    # Real thread, a round every 0.01 s; the test waits for its event, not for time.
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=0.03)  # type: ignore[arg-type]
    mutex.acquire(timeout=1)
    try:
        assert mutex.interval == pytest.approx(0.01)  # ttl/3
        server.expire(server.keys[key_of(mutex)][2])  # type: ignore[arg-type]
        assert mutex.lost.wait(PATIENCE), "the keep-alive never noticed"
        with pytest.raises(LockLost, match="has expired"):
            mutex.require()
    finally:
        mutex.release()


def test_a_dying_keepalive_is_a_lost_lock(server: FakeServer, fake_time: FakeTime,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=0.03)  # type: ignore[arg-type]

    def broken() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(mutex, "renew", broken)
    mutex.acquire(timeout=1)
    try:
        assert mutex.lost.wait(PATIENCE)
        with pytest.raises(LockLost, match=r"its keep-alive failed \(RuntimeError: bug\)"):
            mutex.require()
    finally:
        mutex.release()


def test_a_key_gone_while_waiting_is_lost_not_waited_for(server: FakeServer, fake_time: FakeTime) -> None:
    server.holder(PREFIX + "0", "scheduled_basebackup on w2")
    mutex = FakeEtcd(server).mutex(PREFIX, holder="switchover")

    def lease_runs_out() -> None:
        server.expire(server.keys[key_of(mutex)][2])  # type: ignore[arg-type]

    fake_time.on_sleep[2] = lease_runs_out
    with pytest.raises(LockLost, match="its key disappeared while waiting for the lock"):
        mutex.acquire(timeout=3600)  # pgquartz's lockTimeout may be 100 h: never wait that out for nothing
    assert fake_time.sleeps == [0.5, 0.5]


def test_a_loss_after_release_is_not_reported(server: FakeServer, fake_time: FakeTime) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=30)
    mutex.acquire(timeout=1)
    mutex.release()  # revokes the lease: a keep-alive round still under way finds it gone
    fake_time.now += 60
    mutex.renew()
    mutex.require()
    assert not mutex.lost.is_set()


# --------------------------------------------------------------------------- steps check the lock


@step(retries=0)
def ensure_thing(cluster: str, host: str, done: list[str]) -> str:
    done.append(host)
    return host


@step
def is_thing_there(cluster: str, done: list[str]) -> bool:
    done.append("read")
    return True


@pytest.fixture
def lost_lock(server: FakeServer, fake_time: FakeTime) -> Iterator[EtcdMutex]:
    """A pgquartz-style lock of cluster "lab", already lost (its lease expired)."""
    mutex = FakeEtcd(server).mutex("/pgquartz/purge/", ttl=30, label="the pgquartz lock of job purge")
    mutex.acquire(timeout=1)
    server.expire(server.keys[key_of(mutex)][2])  # type: ignore[arg-type]
    mutex.renew()
    yield mutex
    mutex.release()


# (registered for, lost?, the call) -> the step ran
STEP_CASES = {
    "held": ("lab", False, lambda done: ensure_thing.fn("lab", "pg1", done), True),
    "lost": ("lab", True, lambda done: ensure_thing.fn("lab", "pg1", done), False),
    "lost, cluster by keyword": ("lab", True, lambda done: ensure_thing.fn(host="pg1", cluster="lab", done=done),
                                 False),
    "lost, another cluster's step": ("lab", True, lambda done: ensure_thing.fn("site-a", "pg1", done), True),
    "lost, a read-only is_* step": ("lab", True, lambda done: is_thing_there.fn("lab", done), True),
    "nothing held": (None, True, lambda done: ensure_thing.fn("lab", "pg1", done), True),
}


@pytest.mark.parametrize(("registered", "lost", "call", "ran"), STEP_CASES.values(), ids=STEP_CASES.keys())
def test_a_changing_step_checks_its_clusters_locks_first(server: FakeServer, fake_time: FakeTime,
                                                         registered: str | None, lost: bool,
                                                         call: Callable[[list[str]], Any], ran: bool) -> None:
    mutex = FakeEtcd(server).mutex(PREFIX, ttl=30)
    mutex.acquire(timeout=1)
    try:
        if lost:
            server.expire(server.keys[key_of(mutex)][2])  # type: ignore[arg-type]
            mutex.renew()
        done: list[str] = []
        with contextlib.ExitStack() as stack:
            if registered:
                stack.enter_context(lockwatch.watching(registered, mutex))
            if ran:
                call(done)
            else:
                with pytest.raises(LockLost, match="has expired"):
                    call(done)
        assert bool(done) is ran  # refused before its first line
    finally:
        mutex.release()
    assert lockwatch.held("lab") == []


def test_the_step_wrapper_keeps_what_prefect_reads() -> None:
    # Prefect reads parameters through __wrapped__; the step answers tests (test_step_answers) read hints.
    assert get_call_parameters(ensure_thing.fn, ("lab", "pg1", []), {}) == {"cluster": "lab", "host": "pg1", "done": []}
    assert ensure_thing.fn.__wrapped__.__name__ == "ensure_thing"  # type: ignore[attr-defined]
    assert (ensure_thing.fn.__name__, ensure_thing.fn.__module__) == ("ensure_thing", __name__)
    assert typing.get_type_hints(ensure_thing.fn)["return"] is str
    assert not hasattr(is_thing_there.fn, "__wrapped__")  # an is_* step only reads: nothing to check


def test_a_step_in_a_worker_thread_sees_the_lock(lost_lock: EtcdMutex) -> None:
    # Steps submitted with .submit run in the task runner's threads of the same process.
    done: list[str] = []
    with lockwatch.watching("lab", lost_lock), ThreadPoolExecutor(1) as pool:
        future = pool.submit(ensure_thing.fn, "lab", "pg2", done)
        with pytest.raises(LockLost):
            future.result(PATIENCE)
    assert done == []


def test_a_lost_lock_is_never_retried(lost_lock: EtcdMutex) -> None:
    with pytest.raises(LockLost) as raised:
        lost_lock.require()
    assert runtime._retry_on_transient(None, None, Failed(data=raised.value)) is False


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

            def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "", label: str = "") -> EtcdMutex:
                mutex = super().mutex(prefix, ttl=ttl, holder=holder, label=label)
                harness.mutexes.append(mutex)
                return mutex

        monkeypatch.setattr(locks, "get_run_logger", lambda: logging.getLogger("tests.locks"))
        monkeypatch.setattr(locks, "ensure_cluster_limit", self.ensured.append)
        monkeypatch.setattr(locks, "limit_in_use", lambda cluster: self.asked_in_use.append(cluster) or self.limit_busy)
        monkeypatch.setattr(locks, "concurrency", concurrency)
        # The context hands out the cluster's etcd client (TLS settings and all): here the fake.
        monkeypatch.setattr(locks, "context_for", lambda cluster: SimpleNamespace(
            inventory=INV, etcd=lambda endpoints=None, timeout=3: Etcd(endpoints or client_endpoints(INV),
                                                                      timeout=timeout)))


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch, server: FakeServer, fake_time: FakeTime) -> Iterator[Harness]:
    h = Harness(monkeypatch, server)
    yield h
    for mutex in h.mutexes:
        mutex.release()  # stop any keepalive thread a failing case left behind


BUSY_LIMIT = "cluster lab is busy: another runbook holds Prefect limit cluster-lab"

ETCD_REFUSED = ("cluster lab: refused, nothing changed: its etcd lock cannot be taken (etcd lease grant: no endpoint "
                "answered (fake)). The Prefect lock alone does not exclude runs that bypass Prefect")

# (what the world looks like, wait_seconds, etcd policy) -> (body ran, error type, message, etcd key held in the body)
CLUSTER_LOCK_CASES = {
    "free": ({}, 0, "required", (True, None, None, True)),
    "free, waiting allowed": ({}, 120, "required", (True, None, None, True)),
    "limit taken, no waiting": ({"limit_busy": True}, 0, "required", (False, locks.ClusterBusy, BUSY_LIMIT, False)),
    # With waiting allowed the limit is not peeked at: Prefect's acquire waits for it.
    "limit taken, waiting allowed": ({"limit_busy": True}, 120, "required", (True, None, None, True)),
    "limit stays taken": ({"limit_times_out": True}, 120, "required", (False, locks.ClusterBusy, BUSY_LIMIT, False)),
    "etcd lock held outside Prefect": ({"etcd_holder": "pgquartz on cron1"}, 0, "required",
                                       (False, locks.ClusterBusy,
                                        f"cluster lab is busy: lock {PREFIX} still held by pgquartz on cron1 after 1s",
                                        False)),
    # Not the Prefect lock alone: without etcd, nothing that bypasses Prefect is excluded.
    "etcd down": ({"etcd_down": {"lease grant"}}, 0, "required", (False, LockUnavailable, ETCD_REFUSED, False)),
    "etcd down, waiting allowed": ({"etcd_down": {"lease grant"}}, 120, "required",
                                   (False, LockUnavailable, ETCD_REFUSED, False)),
    "etcd gone after the lease": ({"etcd_down": {"lock create"}}, 0, "required",
                                  (False, LockUnavailable, "cluster lab: refused, nothing changed: its etcd lock "
                                                           "cannot be taken (etcd lock create: no endpoint", False)),
    # build_cluster on bare hosts: there is no etcd yet; it takes the etcd lock once etcd is up.
    "etcd down, bootstrap policy": ({"etcd_down": {"lease grant"}}, 120, "once_up", (True, None, None, False)),
    "etcd up, bootstrap policy": ({}, 120, "once_up", (True, None, None, True)),
    "etcd lock held outside Prefect, bootstrap policy": ({"etcd_holder": "someone"}, 0, "once_up",
                                                         (False, locks.ClusterBusy, "cluster lab is busy: lock", False)),
    # The backup server's rollout on a new site: no etcd yet, the Prefect lock alone; etcd up, both.
    "etcd down, when-up policy": ({"etcd_down": {"lease grant"}}, 120, "if_up", (True, None, None, False)),
    "etcd up, when-up policy": ({}, 120, "if_up", (True, None, None, True)),
    "etcd lock held outside Prefect, when-up policy": ({"etcd_holder": "someone"}, 0, "if_up",
                                                       (False, locks.ClusterBusy, "cluster lab is busy: lock", False)),
}
BOOTSTRAP_WARNING = ("etcd does not answer yet; holding only the Prefect lock for cluster lab until build_cluster has "
                     "brought etcd up (its policy: the etcd lock once etcd is up).")
WHEN_UP_WARNING = ("etcd does not answer; holding only the Prefect lock for cluster lab: backup_server_rollout changes "
                   "no host of the cluster's etcd (its policy: the etcd lock when etcd answers).")


@pytest.mark.parametrize(("world", "wait_seconds", "etcd", "expected"), CLUSTER_LOCK_CASES.values(),
                         ids=CLUSTER_LOCK_CASES.keys())
def test_cluster_lock(harness: Harness, world: dict[str, Any], wait_seconds: float, etcd: locks.EtcdPolicy,
                      expected: tuple[bool, type[BaseException] | None, str | None, bool],
                      caplog: pytest.LogCaptureFixture) -> None:
    ran, error, message, etcd_held = expected
    runbook = {"once_up": "build_cluster", "if_up": "backup_server_rollout"}.get(etcd, "switchover")
    harness.limit_busy = world.get("limit_busy", False)
    harness.limit_times_out = world.get("limit_times_out", False)
    harness.etcd_down |= world.get("etcd_down", set())
    if "etcd_holder" in world:
        harness.server.holder(PREFIX + "ffff", world["etcd_holder"])
    seen: dict[str, Any] = {}

    def body() -> None:
        with locks.cluster_lock("lab", runbook, wait_seconds=wait_seconds, etcd=etcd) as hold:
            seen["in_limit"] = harness.in_limit
            seen["etcd_held"] = any(ours(harness.server, m) for m in harness.mutexes)
            assert lockwatch.held("lab") == [hold]  # what the cluster's steps check

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
        assert f"Holding the lock on cluster lab for {runbook}." in caplog.messages
    assert (BOOTSTRAP_WARNING in caplog.messages) is (ran and not etcd_held and etcd == "once_up")
    assert (WHEN_UP_WARNING in caplog.messages) is (ran and not etcd_held and etcd == "if_up")
    # Whatever happened, nothing of ours is left in etcd, the Prefect slot is given back, and the
    # steps have no lock left to check.
    assert [k for k in harness.server.keys if k != PREFIX + "ffff"] == []
    assert harness.in_limit is False
    assert lockwatch.held("lab") == []


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


# --------------------------------------------------------------------------- cluster_lock: losing it


@pytest.mark.parametrize(("events", "lost"), LOSS_CASES.values(), ids=LOSS_CASES.keys())
def test_a_lost_cluster_lock_stops_the_next_changing_step(harness: Harness, fake_time: FakeTime, events: list[Any],
                                                          lost: tuple[str, str] | None) -> None:
    done: list[str] = []

    def run() -> None:
        with locks.cluster_lock("lab", "add_standby") as hold:
            assert hold.mutex is not None and hold.mutex.interval == locks.LEASE_TTL / 3
            ensure_thing.fn("lab", "pg1", done)
            play(harness.server, fake_time, hold.mutex, events)
            ensure_thing.fn("lab", "pg2", done)

    if lost is None:
        run()
        assert done == ["pg1", "pg2"]
    else:
        with pytest.raises(LockLost) as raised:
            run()
        assert done == ["pg1"]  # stopped before its next change
        assert re.search(lost[0], raised.value.reason), raised.value.reason
        assert raised.value.lock.startswith(f"the cluster lock of lab (etcd key {PREFIX}")
    # Released (a key detached from our lease is not ours to delete: it outlives the lease).
    assert [k for k, (_, _, lease) in harness.server.keys.items() if lease in harness.server.leases
            and lease not in harness.server.dead] == [PREFIX + "ffff"] * ("other holder" in events)
    assert harness.in_limit is False
    assert lockwatch.held("lab") == []


def expire_held(harness: Harness) -> None:
    (mutex,) = [m for m in harness.mutexes if m.key]  # the one holding the lock
    harness.server.expire(harness.server.keys[key_of(mutex)][2])  # type: ignore[arg-type]
    mutex.renew()


def test_a_loss_no_step_noticed_fails_the_run_at_the_end(harness: Harness) -> None:
    with pytest.raises(LockLost, match="has expired"), locks.cluster_lock("lab", "routing_rollout"):
        expire_held(harness)  # and no step ran after it
    assert harness.in_limit is False and lockwatch.held("lab") == []


def test_a_run_failing_otherwise_while_its_lock_is_lost_fails_with_the_loss(harness: Harness) -> None:
    with pytest.raises(LockLost, match="has expired") as raised, locks.cluster_lock("lab", "failover"):
        expire_held(harness)
        raise ValueError("promote failed")  # perhaps because another holder acted meanwhile
    assert isinstance(raised.value.__cause__, ValueError)


# --------------------------------------------------------------------------- holding: the runbooks' policies


def test_a_bootstrap_build_holds_the_prefect_lock_until_etcd_is_up(harness: Harness,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    harness.etcd_down.add("lease grant")  # bare hosts: no etcd yet
    done: list[str] = []
    with caplog.at_level(logging.INFO, logger="tests.locks"), pytest.raises(LockLost), \
            holding("lab", "build_cluster") as hold:
        assert isinstance(hold, locks.ClusterHold) and hold.mutex is None
        assert hold.name == "the cluster lock of lab (Prefect limit only, until etcd is up)"
        ensure_thing.fn("lab", "pg1", done)  # installing etcd: the Prefect lock covers it
        assert harness.server.keys == {}
        harness.etcd_down.clear()  # etcd is up
        hold.take_etcd_lock()
        hold.take_etcd_lock()  # once is enough
        (mutex,) = [m for m in harness.mutexes if m.key]
        assert hold.mutex is mutex and ours(harness.server, mutex) and harness.in_limit
        ensure_thing.fn("lab", "pg2", done)
        expire_held(harness)
        with pytest.raises(LockLost):  # from here on the etcd lock is checked like any other runbook's
            ensure_thing.fn("lab", "pg3", done)
        # (and the run fails at the end of the `with` even though the runbook caught it)
    assert done == ["pg1", "pg2"]
    assert BOOTSTRAP_WARNING in caplog.messages
    assert "etcd is up: holding the etcd lock on cluster lab for build_cluster from here on." in caplog.messages


def test_a_bootstrap_build_stops_if_etcd_still_does_not_answer(harness: Harness) -> None:
    harness.etcd_down.add("lease grant")
    with pytest.raises(LockUnavailable, match=r"^cluster lab: etcd is up but its lock cannot be taken \(etcd lease "
                                              r"grant: .*\); build_cluster stopped before changing more$"):
        with holding("lab", "build_cluster") as hold:
            hold.take_etcd_lock()
    assert harness.in_limit is False


NEEDS_ETCD = sorted(n for n, p in POLICIES.items() if p.lock == "cluster" and p.etcd == "required")


@pytest.mark.parametrize("runbook", NEEDS_ETCD)
def test_every_other_runbook_refuses_without_etcd(harness: Harness, runbook: str) -> None:
    harness.etcd_down.add("lease grant")
    with pytest.raises(LockUnavailable, match="^cluster lab: refused, nothing changed: its etcd lock cannot be taken"):
        with holding("lab", runbook):
            raise AssertionError("must not run")
    assert harness.in_limit is False and lockwatch.held("lab") == []


def test_a_dry_run_holds_nothing(harness: Harness) -> None:
    with holding("lab", "build_cluster", dry_run=True) as hold:
        hold.take_etcd_lock()
        hold.require()
        assert lockwatch.held("lab") == []
    assert harness.ensured == [] and harness.mutexes == []


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


def test_a_tab_job_step_checks_the_pgquartz_lock_before_it_starts(harness: Harness) -> None:
    from tasks import tab

    with pytest.raises(LockLost, match="has expired") as raised:
        with locks.pgquartz_lock("lab", job(), "tab_job"):
            with pytest.raises(JobFileError):  # held: the step instance starts (and finds no job file)
                tab.run_step_instance.fn("lab", "/no/such/job.yml", "s", {}, "pg1", 0.0)
            expire_held(harness)
            # lost: refused before it reads anything
            tab.run_step_instance.fn("lab", "/no/such/job.yml", "s", {}, "pg1", 0.0)
    assert raised.value.lock.startswith("the pgquartz lock of job purge_audit_log (etcd key /pgquartz/purge_audit_log/")
    assert harness.server.keys == {} and lockwatch.held("lab") == []


def test_a_lost_pgquartz_lock_fails_the_job_at_its_end(harness: Harness) -> None:
    with pytest.raises(LockLost), locks.pgquartz_lock("lab", job(), "tab_job"):
        expire_held(harness)
    assert harness.server.keys == {}
