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
from typing import Iterator

import etcd3gw
from etcd3gw import exceptions as etcd_exc
from etcd3gw.lease import Lease

from tasks.errors import BouwsteenError


class EtcdUnavailable(BouwsteenError):
    """No endpoint answered: transient, worth retrying."""


class LockTimeout(BouwsteenError):
    """Someone else held the lock for longer than we were willing to wait."""


class LockKeyTaken(BouwsteenError):
    """The key derived from a fresh lease already exists: another client's, never ours to take."""


@dataclass(frozen=True)
class EtcdMember:
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]


class Etcd:
    def __init__(self, endpoints: list[str], *, timeout: float = 5.0):
        """`endpoints`: "host:port" strings; tried in order, the first that answers is used."""
        if not endpoints:
            raise ValueError("no etcd endpoints given")
        self.endpoints = endpoints
        self.timeout = timeout
        self._client: etcd3gw.client.Etcd3Client | None = None

    def _clients(self) -> Iterator[etcd3gw.client.Etcd3Client]:
        if self._client is not None:
            yield self._client
        for endpoint in self.endpoints:
            host, _, port = endpoint.rpartition(":")
            candidate = etcd3gw.client(host=host, port=int(port), timeout=self.timeout, api_path="/v3/")
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

    def members(self) -> list[EtcdMember]:
        raw = self._call("member list", lambda c: c.members())
        return [
            EtcdMember(m.get("name", ""), tuple(m.get("peerURLs", [])), tuple(m.get("clientURLs", [])))
            for m in raw
        ]

    def endpoint_health(self) -> dict[str, bool]:
        """Per endpoint: does it answer a status request (a quorum read would hang without leader)."""
        health = {}
        for endpoint in self.endpoints:
            host, _, port = endpoint.rpartition(":")
            client = etcd3gw.client(host=host, port=int(port), timeout=self.timeout, api_path="/v3/")
            try:
                status = client.status()
                health[endpoint] = bool(status.get("leader"))
            except etcd_exc.Etcd3Exception:
                health[endpoint] = False
        return health

    # ---------------------------------------------------------------- locks

    def mutex(self, prefix: str, *, ttl: int = 60, holder: str = "") -> "EtcdMutex":
        return EtcdMutex(self, prefix, ttl=ttl, holder=holder)


class EtcdMutex:
    """etcd `concurrency.Mutex` on `prefix` (must end with "/"), kept alive while held."""

    def __init__(self, etcd: Etcd, prefix: str, *, ttl: int = 60, holder: str = ""):
        if not prefix.endswith("/"):
            raise ValueError("a mutex prefix ends with '/'")
        self.etcd = etcd
        self.prefix = prefix
        self.ttl = ttl
        self.holder = holder
        self._lease: Lease | None = None
        self._key: str | None = None
        self._keepalive: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def key(self) -> str | None:
        return self._key

    def holders(self) -> list[tuple[str, bytes]]:
        rows = self.etcd._call(
            "lock read",
            lambda c: c.get_prefix(self.prefix, sort_order="ascend", sort_target="create"),
        )
        return [(meta["key"].decode(), value) for value, meta in rows]

    def acquire(self, timeout: float) -> None:
        lease = self.etcd._call("lease grant", lambda c: c.lease(self.ttl))
        self._lease = lease
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
                    return
                if time.monotonic() > deadline:
                    owner = current[0][1].decode(errors="replace") if current else "?"
                    raise LockTimeout(f"lock {self.prefix} still held by {owner or current[0][0]} after {timeout:.0f}s")
                time.sleep(0.5)
        except BaseException:
            # Not ours after all (taken, timed out, etcd gone mid-wait): a key left behind with a
            # live lease would own the lock for a holder that went on without it.
            self.release()
            raise

    def _start_keepalive(self) -> None:
        self._stop.clear()

        def keep() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    if self._lease is not None:
                        self._lease.refresh()
                except etcd_exc.Etcd3Exception:
                    # A missed refresh is survivable; the lease expires only after ttl.
                    continue

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

    def __enter__(self) -> "EtcdMutex":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
