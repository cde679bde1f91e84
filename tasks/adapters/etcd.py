"""etcd v3 through etcd3gw (its JSON gateway): key reads, member health, and lease locks.

The lock follows etcd's own `concurrency.Mutex` protocol (the one PgQuartz uses): each waiter
creates `<prefix><lease id in hex>` under a lease; the key with the lowest create revision owns
the lock. etcd3gw's own `Lock` uses a different key scheme, so a cron-run PgQuartz would not
see it; speaking the Mutex protocol makes the two exclude each other.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc
from etcd3gw.lease import Lease

from tasks.adapters.client_tls import ClientTls
from tasks.errors import BouwsteenError, LockLost


class EtcdUnavailable(BouwsteenError):
    """No endpoint answered: transient, worth retrying."""


class LockTimeout(BouwsteenError):
    """Someone else held the lock for longer than we were willing to wait."""


class LockKeyTaken(BouwsteenError):
    """The key derived from a fresh lease already exists: another client's, never ours to take."""


@dataclass(frozen=True)
class EtcdMember:
    name: str  # empty for a member added but not started yet
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    id: int = 0


class Etcd:
    def __init__(self, endpoints: list[str], *, timeout: float = 5.0, tls: ClientTls | None = None):
        """`endpoints`: "host:port" strings; tried in order, the first that answers is used.
        `tls`: https, the members verified against its CA, its client pair presented."""
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self.endpoints = endpoints
        self.timeout = timeout
        self.tls = tls
        self._client: etcd3gw.client.Etcd3Client | None = None

    def _client_for(self, endpoint: str) -> etcd3gw.client.Etcd3Client:
        host, _, port = endpoint.rpartition(":")
        if self.tls is None:
            return etcd3gw.client(host=host, port=int(port), timeout=self.timeout, api_path="/v3/")
        # Our own session, deaf to the environment: requests lets REQUESTS_CA_BUNDLE override a
        # session's CA (psf/requests#3829), and no proxy variable may reroute etcd traffic.
        session = requests.Session()
        session.trust_env = False
        session.verify = self.tls.rootcert
        if self.tls.cert and self.tls.key:
            session.cert = (self.tls.cert, self.tls.key)
        return etcd3gw.client(host=host, port=int(port), timeout=self.timeout, api_path="/v3/", protocol="https",
                              session=session)

    def _clients(self) -> Iterator[etcd3gw.client.Etcd3Client]:
        if self._client is not None:
            yield self._client
        for endpoint in self.endpoints:
            candidate = self._client_for(endpoint)
            if self._client is not None and candidate.base_url == self._client.base_url:
                continue
            yield candidate

    def _call(self, what: str, fn):
        errors = []
        for client in self._clients():
            try:
                result = fn(client)
                self._client = client
                return result
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError, etcd_exc.InternalServerError) as exc:
                errors.append(f"{client.host}:{client.port}: {type(exc).__name__}")
                if self._client is client:
                    self._client = None
        raise EtcdUnavailable(f"etcd {what}: no endpoint answered ({'; '.join(errors)})")

    # ---------------------------------------------------------------- reads

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        rows = self._call("get", lambda c: c.get_prefix(prefix))
        return {meta["key"].decode(): value for value, meta in rows}

    def get(self, key: str) -> bytes | None:
        rows = self._call("get", lambda c: c.get(key))
        return rows[0] if rows else None

    def put(self, key: str, value: str) -> None:
        self._call("put", lambda c: c.put(key, value))

    def delete_prefix(self, prefix: str) -> int:
        """Every key under `prefix` deleted; how many there were."""
        if not prefix.endswith("/") or prefix.count("/") < 3:
            # A short prefix would take other clusters' state (or pgquartz's locks) with it.
            raise ValueError(f"etcd delete_prefix: {prefix!r} is not a cluster's own prefix")
        present = len(self.get_prefix(prefix))
        self._call("delete", lambda c: c.delete_prefix(prefix))
        return present

    def members(self) -> list[EtcdMember]:
        raw = self._call("member list", lambda c: c.members())
        return [
            EtcdMember(m.get("name", ""), tuple(m.get("peerURLs", [])), tuple(m.get("clientURLs", [])),
                       int(m.get("ID", 0)))
            for m in raw
        ]

    # ---------------------------------------------------------------- membership
    # etcd3gw has no call for these; its own request path (`post`) keeps the verified session.
    # The gRPC gateway takes uint64 IDs as JSON strings, the way it prints them.

    def member_remove(self, member_id: int) -> None:
        self._call("member remove", lambda c: c.post(c.get_url("/cluster/member/remove"), json={"ID": str(member_id)}))

    def member_add(self, peer_urls: list[str]) -> EtcdMember:
        """Announce a member before it starts (it then starts with the existing cluster state)."""
        raw = self._call("member add", lambda c: c.post(c.get_url("/cluster/member/add"), json={"peerURLs": peer_urls}))
        m = raw.get("member", {})
        return EtcdMember(m.get("name", ""), tuple(m.get("peerURLs", [])), tuple(m.get("clientURLs", [])),
                          int(m.get("ID", 0)))

    def answering_endpoints(self) -> list[str]:
        """The endpoints that answer a status request at all, leader or not."""
        answering = []
        for endpoint in self.endpoints:
            try:
                self._client_for(endpoint).status()
                answering.append(endpoint)
            except etcd_exc.Etcd3Exception:
                continue
        return answering

    def endpoint_health(self) -> dict[str, bool]:
        """Per endpoint: does it answer a status request (a quorum read would hang without leader)."""
        health = {}
        for endpoint in self.endpoints:
            client = self._client_for(endpoint)
            try:
                status = client.status()
                health[endpoint] = bool(status.get("leader"))
            except etcd_exc.Etcd3Exception:
                health[endpoint] = False
        return health

    # ---------------------------------------------------------------- locks

    def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "", label: str = "") -> "EtcdMutex":
        return EtcdMutex(self, prefix, ttl=ttl, holder=holder, label=label)


def lease_keepalive(client: etcd3gw.client.Etcd3Client, lease_id: int) -> int:
    """One LeaseKeepAlive through `client`: the lease's TTL from now, ≤ 0 once etcd has let it expire."""
    return Lease(lease_id, client).refresh()


def utc_text(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


class EtcdMutex:
    """etcd `concurrency.Mutex` on `prefix` (must end with "/"), kept alive while held.

    While held, a keep-alive thread renews the lease every ttl/3, through whichever endpoint
    answers, and checks after each renewal that the lease is alive (TTL > 0) and the lock key is
    still ours (first in line, our value, our lease). When it is not, or when no renewal has been
    confirmed within the lease's TTL (so etcd has let it expire, or will), the loss is recorded:
    `lost` is set and `require()` raises LockLost from then on. `renew()` is one such round."""

    def __init__(self, etcd: Etcd, prefix: str, *, ttl: int = 60, holder: str = "", label: str = ""):
        if not prefix.endswith("/"):
            raise ValueError("a mutex prefix ends with '/'")
        self.etcd = etcd
        self.prefix = prefix
        self.ttl = ttl
        self.holder = holder
        self.label = label or f"lock {prefix}"
        self.interval = ttl / 3
        self.lost = threading.Event()
        self.loss: LockLost | None = None
        self._lease: Lease | None = None
        self._key: str | None = None
        self._held = False  # first in line: only then is a key ahead of ours a loss
        self._expires = 0.0  # monotonic: the lease's end as last confirmed by etcd
        self._keepalive: threading.Thread | None = None
        self._stop = threading.Event()
        self._guard = threading.Lock()

    @property
    def key(self) -> str | None:
        return self._key

    @property
    def name(self) -> str:
        return f"{self.label} (etcd key {self._key})" if self._key else self.label

    def holders(self) -> list[tuple[str, bytes]]:
        return [(key, value) for key, value, _ in self._holders()]

    def _holders(self) -> list[tuple[str, bytes, int | None]]:
        """(key, value, lease id or None) under the prefix, oldest create revision first."""
        rows = self.etcd._call(
            "lock read",
            lambda c: c.get_prefix(self.prefix, sort_order="ascend", sort_target="create"),
        )
        return [(meta["key"].decode(), value, int(meta["lease"]) if meta.get("lease") else None)
                for value, meta in rows]

    def acquire(self, timeout: float) -> None:
        self.lost.clear()
        self.loss = None
        self._held = False
        granted = time.monotonic()
        lease = self.etcd._call("lease grant", lambda c: c.lease(self.ttl))
        self._lease = lease
        self._expires = granted + self.ttl
        self._key = f"{self.prefix}{lease.id:x}"
        try:
            created = self.etcd._call("lock create", lambda c: c.create(self._key, self.holder, lease=lease))
            if not created:
                raise LockKeyTaken(f"lock key {self._key} already exists")
            self._start_keepalive()
            deadline = time.monotonic() + timeout
            while True:
                current = self.holders()
                if current and current[0][0] == self._key:
                    self.require()  # a lease that ran out while we waited owns nothing
                    self._held = True
                    return
                if all(key != self._key for key, _ in current):
                    self._lose(f"its key disappeared while waiting for the lock (lease {lease.id:x} expired "
                               "or was revoked)")
                self._raise_if_lost()
                if time.monotonic() > deadline:
                    owner = current[0][1].decode(errors="replace") if current else "?"
                    raise LockTimeout(f"lock {self.prefix} still held by {owner or current[0][0]} after {timeout:.0f}s")
                time.sleep(0.5)
        except BaseException:
            # Not ours after all (taken, timed out, etcd gone mid-wait): a key left behind with a
            # live lease would own the lock for a holder that went on without it.
            self.release()
            raise

    # ---------------------------------------------------------------- loss

    def require(self) -> None:
        """Raise LockLost if the lock was lost, or if etcd has not confirmed the lease within its
        TTL (a renewal overdue, however stuck the keep-alive thread is): never act on a lock that
        may have expired."""
        if not self.lost.is_set() and self._lease is not None and time.monotonic() >= self._expires:
            self._lose(self._overdue(None), since=self._expires)
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        loss = self.loss
        if self.lost.is_set() and loss is not None:
            raise LockLost(loss.lock, loss.lost_at, loss.reason)  # a fresh one each time it is raised

    def renew(self) -> None:
        """One keep-alive round: renew the lease, then check the key is still ours."""
        lease = self._lease
        if lease is None or self.lost.is_set() or self._stop.is_set():
            return
        sent = time.monotonic()
        try:
            ttl = self.etcd._call("lease keepalive", lambda c: lease_keepalive(c, lease.id))
        except (EtcdUnavailable, etcd_exc.Etcd3Exception) as exc:
            # A missed renewal is survivable while the lease lasts; past its end it is a loss.
            if time.monotonic() >= self._expires:
                self._lose(self._overdue(exc), since=self._expires)
            return
        if ttl <= 0:
            self._lose(f"etcd says lease {lease.id:x} has expired (keep-alive TTL {ttl})")
            return
        self._expires = sent + ttl  # counted from before the request: never later than etcd's own
        try:
            current = self._holders()
        except (EtcdUnavailable, etcd_exc.Etcd3Exception):
            return  # the lease is alive; the key is checked again next round
        problem = self._not_ours(current, lease.id)
        if problem:
            self._lose(problem)

    def _not_ours(self, current: list[tuple[str, bytes, int | None]], lease_id: int) -> str | None:
        mine = next((row for row in current if row[0] == self._key), None)
        if mine is None:
            return f"its key {self._key} is gone from etcd" + (
                f" (now held by {_named(current[0])})" if current else "")
        if current[0][0] != self._key and self._held:
            # While waiting in line the keep-alive runs too (a wait may outlast the lease); a
            # holder ahead of us is then the reason we wait, not a loss.
            return f"{_named(current[0])} is ahead of its key {self._key}"
        if mine[1] != self.holder.encode():
            return f"its key {self._key} was overwritten: it says {mine[1].decode(errors='replace')!r}"
        if mine[2] != lease_id:
            return f"its key {self._key} is no longer attached to lease {lease_id:x}"
        return None

    def _overdue(self, error: BaseException | None) -> str:
        cause = f" (last error: {_why(error)})" if error is not None else ""
        return (f"etcd has not confirmed lease {self._lease.id if self._lease else 0:x} within its {self.ttl:g} s TTL "
                f"(renewed every {self.interval:g} s){cause}, so etcd has let the lock go or will")

    def _lose(self, reason: str, *, since: float | None = None) -> None:
        """Record the loss (once; not after release). `since`: when it happened (monotonic), if
        earlier than now: the end of the lease as last confirmed."""
        with self._guard:
            if self.lost.is_set() or self._stop.is_set():
                return
            now = time.time()
            if since is not None:
                now -= max(time.monotonic() - since, 0.0)
            self.loss = LockLost(self.name, utc_text(now), reason)
            self.lost.set()

    def _start_keepalive(self) -> None:
        self._stop.clear()

        def keep() -> None:
            try:
                while not self._stop.wait(self.interval) and not self.lost.is_set():
                    self.renew()
            except Exception as exc:  # a keep-alive that dies renews nothing: the lock is as good as lost
                self._lose(f"its keep-alive failed ({type(exc).__name__}: {exc})")

        self._keepalive = threading.Thread(target=keep, name=f"etcd-lease-{self.prefix}", daemon=True)
        self._keepalive.start()

    def release(self) -> None:
        self._stop.set()
        if self._lease is not None:
            try:
                self._lease.revoke()
            except etcd_exc.Etcd3Exception:
                pass  # the lease expires by itself after ttl
        self._lease = None
        self._key = None
        self._held = False

    def __enter__(self) -> "EtcdMutex":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _why(error: BaseException) -> str:
    """etcd3gw's errors keep their text in `detail_text`, not in their args."""
    return str(error) or str(getattr(error, "detail_text", None) or "") or type(error).__name__


def _named(row: tuple[str, bytes, int | None]) -> str:
    return row[1].decode(errors="replace") or row[0]
