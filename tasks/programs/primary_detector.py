"""bouwsteen primary detector: tells HAProxy which PostgreSQL host is primary or standby.

A drop-in replacement for pgroute66 that runs on each router host under systemd:

    python3 /usr/local/lib/bouwsteen/primary_detector.py -c /etc/bouwsteen/primary-detector.yaml

This file is uploaded verbatim, so it may import only the standard library, ``psycopg`` (3.1,
Debian's python3-psycopg) and ``yaml`` (python3-yaml); both are imported lazily so the pure
parts can be unit-tested without them.

Command line
    -c FILE   config file (default /etc/bouwsteen/primary-detector.yaml)
    -d        debug logging (same as ``loglevel: debug``)
    -v        print the version and exit 0
    Exit codes: 0 clean stop (SIGTERM/SIGINT), 1 invalid config, 2 cannot bind/serve.

Config (pgroute66's format; unknown keys are ignored with a warning)
    hosts:   {name: {host, port, user, dbname, sslmode, connect_timeout, b64password, <libpq keyword>...}}
    groups:  {group: [name, ...]}          # every member must be a key of hosts
    bind: localhost                         # IPv4 is preferred when a name resolves to both
    port: 8080
    loglevel: info                          # debug | info | warning | error
    logfile: /path                          # optional, appended (journald is used otherwise)
    query_timeout: 1.0                      # seconds; per-scan deadline and statement_timeout
    cache_ms: 200                           # one scan answers every request within this window
    max_standby_lag_bytes: null             # only /v1/standby/<name> applies it (receive - replay)
    max_standby_staleness_seconds: null     # only /v1/standby/<name> applies it (heartbeat age)
    Host names ``primary``, ``primaries``, ``standby``, ``standbys`` (they clash with routes),
    names containing ``/`` and a group named ``all`` are refused. ``ssl.b64cert``+``ssl.b64key``
    (pgroute66's TLS) is refused rather than silently served as plain HTTP: bind to loopback.
    pgx-only pool keys (``pool_*``) are dropped; other host keys go to libpq and are validated
    at start-up.

Routes (GET or HEAD, indented JSON bodies, sorted lists). ``?group=`` as in pgroute66 (gin reads
it through Go's url.ParseQuery): left out, or ``all``, means every host; an empty ``?group=`` is a
group named "" like any other, so undefined (no hosts) unless groups: defines it; the first value
of a repeated key counts; a pair holding ``;`` or a bad %-escape is dropped.
    /v1/primary              200 "name" | 404 "" none | 409 "" two or more (split brain)
    /v1/primaries            200 [...]   (``[]`` when empty; pgroute66 returns ``null``)
    /v1/standbys             200 [...]   (``[]`` when empty; lag limit NOT applied, as pgroute66)
    /v1/<name>/status        200 "primary"|"standby" | 404 "invalid" | 422 "unavailable"
    /v1/<name>/availability  200 "ok" | 408 "exceeded (exceeded <limit> by <age> msec)" | 417 why the
                             age is unknown ("invalid" for an unknown name). The age is <name>'s
                             heartbeat staleness (below) in whole seconds, measured in ?group=
                             (default all); pgroute66's text says msec, its numbers are seconds.
                             ?limit=N seconds, default 10; an empty one (pgroute66's -1) or a
                             negative one only needs a known age
    /v1/primary/<name>       200 "name" iff exactly one primary in the group and it is <name>,
                             else 503 ""; 404 "invalid" for an unknown name (HAProxy httpchk)
    /v1/standby/<name>       200 "name" iff <name> is a reachable standby (in the group, and within
                             max_standby_lag_bytes and max_standby_staleness_seconds when set; an
                             unknown lag or staleness then fails), else 503 ""
    /healthz                 200 "ok" (the detector itself, no database query)
    HAProxy's plain ``option httpchk`` sends ``OPTIONS /``; checks must GET (or HEAD) a route.

Heartbeat (pgroute66's availability table, ``public.pgr66_avc (pgr66_avc timestamp)``, UTC)
    Every probe also reads the host's wall clock and ``max(pgr66_avc)`` as that host sees it. After a
    scan of a group (not of one host for /status) that saw exactly one primary, the detector sets the
    row to the primary's ``clock_timestamp()``, at most once per second per primary, on a connection
    of its own (``synchronous_commit=local``) so that no check ever waits for the write. The table is
    created by the build (the detector only needs SELECT, INSERT and UPDATE on it, never CREATE);
    while it is missing nothing is written and the staleness is unknown.
    A standby's staleness is the age of the newest heartbeat it has replayed, on the detector's own
    monotonic clock: the primary's probe gives the offset between the primary's clock and the
    detector's, so a heartbeat (a primary timestamp) maps to the detector time it was written at.
    Standbys' clocks are never used, so clock skew between hosts cannot hide a stale standby. The
    offset of a group's last single primary is kept, so while a failover leaves no primary the
    standbys' staleness goes on growing (they stay up until it exceeds the limit); before the
    detector has seen a primary of the group, or while a host cannot read the table, it is unknown.
    Unlike receive-minus-replay (max_standby_lag_bytes), this catches a standby whose WAL receiver
    stopped: its lag in bytes stays 0 while its heartbeat grows old.

Differences from pgroute66 that matter operationally: hosts are probed in parallel with a hard
deadline (a hung host cannot stall every check), a host unavailable at its last probe is not
waited for at all (it counts again from the scan after it answers), one scan is shared by all
requests within cache_ms, probe errors are logged at warning level with the host name (throttled), and role
changes are logged at info level.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import concurrent.futures
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, unquote_plus, urlsplit

if TYPE_CHECKING:  # pragma: no cover - typing only; psycopg is imported lazily at run time
    import psycopg

VERSION = "1.0.0"
DEFAULT_CONFIG = "/etc/bouwsteen/primary-detector.yaml"
APPLICATION_NAME = "bouwsteen-primary-detector"

log = logging.getLogger("primary_detector")

Role = Literal["primary", "standby"]

# Route words that a host name would shadow (/v1/<name>/status vs /v1/primary/<name>).
RESERVED_HOST_NAMES = frozenset({"primary", "primaries", "standby", "standbys"})
ALL_GROUP = "all"

_TOP_LEVEL_KEYS = frozenset(
    {"hosts", "groups", "bind", "port", "loglevel", "logfile", "ssl",
     "query_timeout", "cache_ms", "max_standby_lag_bytes", "max_standby_staleness_seconds"}
)
_LOGLEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "warn": logging.WARNING, "error": logging.ERROR}
# Go's url.ParseQuery drops a pair with a malformed %-escape.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A host that keeps failing with the same error would otherwise log a warning on every scan
# (HAProxy checks every 2 s per server); repeat an unchanged message at most this often.
_WARN_REPEAT_S = 60.0
# A primary's heartbeat row is written at most this often (seconds); a standby's staleness can
# read up to this much (plus the time between HAProxy's checks) older than its replay really is.
HEARTBEAT_INTERVAL_S = 1.0
# pgroute66's /v1/<name>/availability limit when ?limit= is left out (seconds).
AVAILABILITY_LIMIT_S = 10
HEARTBEAT_TABLE = "public.pgr66_avc"


class ConfigError(Exception):
    """The config cannot be used; main() prints it and exits 1."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    hosts: dict[str, dict[str, str]]
    groups: dict[str, list[str]]
    bind: str = "localhost"
    port: int = 8080
    loglevel: str = "info"
    logfile: str | None = None
    query_timeout: float = 1.0
    cache_ms: int = 200
    max_standby_lag_bytes: int | None = None
    max_standby_staleness_seconds: float | None = None
    # Collected while parsing because logging is configured only after the config is read.
    warnings: tuple[str, ...] = ()


def _libpq_value(value: Any) -> str:
    # YAML turns `sslcompression: on` into True; libpq wants 1/0, not "True".
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _parse_host(name: str, raw: Any, warnings: list[str]) -> dict[str, str]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"hosts.{name} must be a mapping of libpq keywords")
    params: dict[str, str] = {}
    for key, value in raw.items():
        key = str(key)
        if value is None:
            continue
        if isinstance(value, (Mapping, list)):
            raise ConfigError(f"hosts.{name}.{key} must be a scalar")
        if key == "b64password":
            try:
                params["password"] = base64.b64decode(str(value), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ConfigError(f"hosts.{name}.b64password is not valid base64: {exc}") from None
        elif key.startswith("pool_"):
            # pgx pool settings (pool_max_conns...) mean nothing to libpq and would fail connect.
            warnings.append(f"hosts.{name}.{key} is a pgx pool setting; ignored")
        else:
            params[key] = _libpq_value(value)
    # pgroute66 falls back to localhost, libpq to the Unix socket; keep pgroute66's behaviour.
    if "host" not in params and not os.environ.get("PGHOST"):
        params["host"] = "localhost"
    return params


def _number(raw: Mapping[str, Any], key: str, default: float, *, integer: bool,
            minimum: float, strictly_greater: bool = False) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum or (strictly_greater and value == minimum):
        raise ConfigError(f"{key} must be {'>' if strictly_greater else '>='} {minimum}, got {value!r}")
    return value


def parse_config(text: str) -> Config:
    """Parse and validate the YAML text; raises ConfigError with a message fit for stderr."""
    import yaml  # lazily: the module must import without it

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError("config must be a YAML mapping")
    warnings: list[str] = [f"unknown config key {k!r} ignored" for k in raw if k not in _TOP_LEVEL_KEYS]

    raw_hosts = raw.get("hosts")
    if not isinstance(raw_hosts, Mapping) or not raw_hosts:
        raise ConfigError("hosts: must be a non-empty mapping of host name to connection settings")
    hosts: dict[str, dict[str, str]] = {}
    for key, value in raw_hosts.items():
        name = str(key)
        if name in RESERVED_HOST_NAMES:
            raise ConfigError(
                f"host name {name!r} is reserved (it clashes with the /v1/{name} route); "
                f"rename it (reserved: {', '.join(sorted(RESERVED_HOST_NAMES))})"
            )
        if not name or "/" in name or name != name.strip():
            raise ConfigError(f"host name {name!r} cannot be used in a URL path")
        hosts[name] = _parse_host(name, value, warnings)

    raw_groups = raw.get("groups") or {}
    if not isinstance(raw_groups, Mapping):
        raise ConfigError("groups: must be a mapping of group name to a list of host names")
    if "host_groups" in raw and "groups" not in raw:
        warnings.append("host_groups: is not read (pgroute66's example is wrong); use groups:")
    groups: dict[str, list[str]] = {}
    for key, members in raw_groups.items():
        group = str(key)
        if group == ALL_GROUP:
            raise ConfigError("group name 'all' is reserved: it means every host")
        if members is None:
            members = []
        if not isinstance(members, list):
            raise ConfigError(f"groups.{group} must be a list of host names")
        names = [str(m) for m in members]
        unknown = sorted(set(names) - set(hosts))
        if unknown:
            # A typo here would keep that HAProxy server DOWN forever; fail at start instead.
            raise ConfigError(f"groups.{group} names unknown hosts: {', '.join(unknown)}")
        groups[group] = sorted(set(names))

    bind = raw.get("bind", "localhost")
    if bind is None:
        bind = "localhost"
    if not isinstance(bind, str):
        raise ConfigError(f"bind must be a string, got {bind!r}")
    port = _number(raw, "port", 8080, integer=True, minimum=0)
    if port > 65535:
        raise ConfigError(f"port must be <= 65535, got {port}")

    ssl_conf = raw.get("ssl")
    if isinstance(ssl_conf, Mapping) and ssl_conf.get("b64cert") and ssl_conf.get("b64key"):
        raise ConfigError("ssl (TLS) is not supported; remove ssl: and bind to 127.0.0.1")
    if ssl_conf is not None:
        warnings.append("ssl: without both b64cert and b64key has no effect; ignored")

    loglevel = str(raw.get("loglevel") or "info").lower()
    if loglevel not in _LOGLEVELS:
        warnings.append(f"unknown loglevel {loglevel!r}; using info")
        loglevel = "info"
    logfile = raw.get("logfile")

    query_timeout = float(_number(raw, "query_timeout", 1.0, integer=False, minimum=0,
                                  strictly_greater=True))
    cache_ms = _number(raw, "cache_ms", 200, integer=True, minimum=0)
    lag = raw.get("max_standby_lag_bytes")
    if lag is not None:
        lag = _number(raw, "max_standby_lag_bytes", 0, integer=True, minimum=0)
    staleness = raw.get("max_standby_staleness_seconds")
    if staleness is not None:
        staleness = float(_number(raw, "max_standby_staleness_seconds", 0, integer=False, minimum=0))
        if not math.isfinite(staleness):
            raise ConfigError(f"max_standby_staleness_seconds must be finite, got {staleness!r}")

    return Config(
        hosts=hosts, groups=groups, bind=bind, port=port, loglevel=loglevel,
        logfile=str(logfile) if logfile else None, query_timeout=query_timeout,
        cache_ms=cache_ms, max_standby_lag_bytes=lag, max_standby_staleness_seconds=staleness,
        warnings=tuple(warnings),
    )


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_config(text)


# --------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class HostState:
    """What one probe saw. role None = unavailable (error, timeout): neither primary nor standby."""

    role: Role | None
    lag_bytes: int | None = None
    # The host's wall clock while it was probed (Unix seconds); only a primary's is ever used.
    clock: float | None = None
    # max(pgr66_avc) as this host sees it (Unix seconds; the primary's clock when it was written);
    # None with no row, or when it could not be read (then heartbeat_error says why).
    heartbeat: float | None = None
    heartbeat_error: str | None = None


UNAVAILABLE = HostState(None)


@dataclass
class _Outcome:
    state: HostState
    error: str | None
    finished: float
    # The host's wall clock minus the Detector's monotonic clock, both read during this probe.
    offset: float | None = None


@dataclass
class _Probe:
    """One probe of one host; shared by every scan that starts within cache_ms of it."""

    started: float
    deadline: float
    future: concurrent.futures.Future[_Outcome]
    reported: bool = False
    # False for a host that was unavailable at its last probe: scans do not wait for it (a dead
    # host's connect attempt would hold every check for the whole deadline, e.g. right after a
    # failover); its answer counts from the first scan after it arrives.
    awaited: bool = True


class Clock:
    """The Detector's time: a monotonic reading and a bounded wait for a probe's answer.

    The one seam through which tests drive the Detector's time (a fake whose wait moves its own
    reading on); the Detector reads time through nothing else. This default is the real clock.
    """

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, future: concurrent.futures.Future[Any], timeout: float) -> None:
        """Return when future is done or timeout seconds have passed, whichever is first."""
        concurrent.futures.wait([future], timeout=timeout)


class _Throttle:
    """Warn when a host's message changes, repeat an unchanged one only every _WARN_REPEAT_S."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def warn(self, key: str, message: str) -> None:
        now = self._clock.monotonic()
        with self._lock:
            prev = self._last.get(key)
            loud = prev is None or prev[0] != message or now - prev[1] >= _WARN_REPEAT_S
            if loud:
                self._last[key] = (message, now)
        log.log(logging.WARNING if loud else logging.DEBUG, "%s", message)

    def clear(self, key: str) -> None:
        with self._lock:
            self._last.pop(key, None)


class Detector:
    """Decides primary/standby from injected probes; no I/O of its own besides threads.

    Single flight per host: a host has at most one probe running. That bounds the thread pool
    (a hung host holds one worker, never more) and keeps a psycopg connection single-threaded.

    ``clock`` and ``executor`` exist for tests (time they move by hand, probes they finish by
    hand); left out, they are the real clock and a thread pool of one worker per host.
    """

    def __init__(
        self,
        hosts: Iterable[str],
        groups: Mapping[str, Iterable[str]],
        probe: Callable[[str], HostState],
        *,
        query_timeout: float = 1.0,
        cache_ms: int = 200,
        max_standby_lag_bytes: int | None = None,
        max_standby_staleness_seconds: float | None = None,
        heartbeat: Callable[[str], None] | None = None,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        clock: Clock | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.hosts: list[str] = sorted(hosts)
        self.groups: dict[str, list[str]] = {g: sorted(m) for g, m in groups.items()}
        self._probe = probe
        self.query_timeout = query_timeout
        self.cache_s = cache_ms / 1000.0
        self.max_standby_lag_bytes = max_standby_lag_bytes
        self.max_standby_staleness_seconds = max_standby_staleness_seconds
        self._heartbeat = heartbeat
        self.heartbeat_interval = heartbeat_interval
        self._lock = threading.Lock()
        self._probes: dict[str, _Probe] = {}
        self._roles: dict[str, Role | None] = {}
        # Per group (its sorted members): the last single primary a scan of it saw, with that
        # host's clock offset; what the group's heartbeats are measured against.
        self._references: dict[tuple[str, ...], tuple[str, float]] = {}
        # Per primary: when the latest heartbeat write began, and that write.
        self._beats: dict[str, tuple[float, concurrent.futures.Future[None]]] = {}
        self._clock = clock if clock is not None else Clock()
        self._throttle = _Throttle(self._clock)
        # One worker per host for its probe and one for its heartbeat write: neither waits for
        # the other (threads are started only when needed).
        self._pool = executor if executor is not None else concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, 2 * len(self.hosts)), thread_name_prefix="probe"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- scanning

    def members(self, group: str | None) -> list[str] | None:
        """Hosts of a group; None (after a warning) when the group is not defined.

        None (no ``?group=``) and ``all`` mean every host. "" is not: pgroute66 defaults only a
        missing ``group`` key to ``all`` (gin's DefaultQuery), so an empty one names no group.
        """
        if group is None or group == ALL_GROUP:
            return self.hosts
        if group in self.groups:
            return self.groups[group]
        hint = " (an empty ?group= is not 'all': leave it out)" if group == "" else ""
        self._throttle.warn(f"group:{group}", f"hostgroup {group!r} is not defined; treated as empty{hint}")
        return None

    def scan(self, group: str | None = None) -> dict[str, HostState]:
        names = self.members(group)
        return self.scan_hosts(names or [], group_scan=True)

    def scan_hosts(self, names: Iterable[str], *, group_scan: bool = False) -> dict[str, HostState]:
        """The state of each host. ``group_scan``: names are a group's members, so a single
        primary among them is the group's (its clock offset is kept, its heartbeat written)."""
        names = sorted(set(names))
        now = self._clock.monotonic()
        with self._lock:
            probes = {name: self._current_probe(name, now) for name in names}
        # Each probe is waited for only until its own deadline: a hung probe reused from an
        # earlier scan must not stretch this scan to the deadline of the fresh ones.
        for probe in sorted((p for p in probes.values() if p.awaited), key=lambda p: p.deadline):
            remaining = probe.deadline - self._clock.monotonic()
            if remaining > 0 and not probe.future.done():
                self._clock.wait(probe.future, remaining)
        states = {name: self._state(name, probe) for name, probe in probes.items()}
        if group_scan:
            self._after_group_scan(tuple(names), states, probes)
        return states

    def _after_group_scan(self, key: tuple[str, ...], states: Mapping[str, HostState],
                          probes: Mapping[str, _Probe]) -> None:
        primaries = [n for n, s in states.items() if s.role == "primary"]
        if len(primaries) != 1:
            return  # none, or split brain: no reference and no heartbeat for either
        (primary,) = primaries
        # A primary state comes only from a probe that answered in time.
        offset = probes[primary].future.result().offset
        if offset is not None:
            with self._lock:
                self._references[key] = (primary, offset)
        if self._heartbeat is not None and states[primary].heartbeat_error is None:
            self._maybe_beat(primary)

    def _maybe_beat(self, name: str) -> None:
        now = self._clock.monotonic()
        with self._lock:
            last = self._beats.get(name)
            if last is not None and (not last[1].done() or now - last[0] < self.heartbeat_interval):
                return
            # Under the lock, as probes are started: at most one write per primary at a time.
            self._beats[name] = (now, self._pool.submit(self._beat, name))

    def _beat(self, name: str) -> None:
        assert self._heartbeat is not None
        try:
            self._heartbeat(name)
        except Exception as exc:  # noqa: BLE001 - a failed write only leaves the heartbeat older
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            self._throttle.warn(f"heartbeat:{name}", f"host {name}: heartbeat not written: {text}")
        else:
            self._throttle.clear(f"heartbeat:{name}")

    def _current_probe(self, name: str, now: float) -> _Probe:
        probe = self._probes.get(name)
        # Reuse a running probe (a concurrent scan started it, or it hangs and must not be
        # duplicated) and a finished one that is still fresh; otherwise start a new one.
        if probe is not None and (not probe.future.done() or now - probe.started < self.cache_s):
            return probe
        future = self._pool.submit(self._run, name)
        last_seen_unavailable = name in self._roles and self._roles[name] is None
        probe = _Probe(started=now, deadline=now + self.query_timeout, future=future,
                       awaited=not last_seen_unavailable)
        self._probes[name] = probe
        return probe

    def _run(self, name: str) -> _Outcome:
        try:
            started = self._clock.monotonic()
            state = self._probe(name)
            if not isinstance(state, HostState):
                raise TypeError(f"probe returned {type(state).__name__}, not HostState")
            finished = self._clock.monotonic()
            # The host read its clock somewhere between the two readings of ours.
            offset = None if state.clock is None else state.clock - (started + finished) / 2
            return _Outcome(state, None, finished, offset)
        except Exception as exc:  # noqa: BLE001 - every failure only means "unavailable"
            # libpq messages span lines ("\n\tIs the server running..."); keep one log line.
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            return _Outcome(UNAVAILABLE, text, self._clock.monotonic())

    def _state(self, name: str, probe: _Probe) -> HostState:
        if not probe.future.done() and not probe.awaited:
            return UNAVAILABLE  # still unavailable, as already reported; its probe is under way
        if not probe.future.done():
            # No elapsed time in the text: a changing message would defeat the throttle.
            self._throttle.warn(name, f"host {name}: unavailable: no answer within "
                                      f"{self.query_timeout:g}s")
            self._note_role(name, None)
            return UNAVAILABLE
        outcome = probe.future.result()
        if outcome.error is None and outcome.finished > probe.deadline:
            # Answered, but too late to have been used by the scan that asked; keep it consistent.
            state, error = UNAVAILABLE, f"answered after the {self.query_timeout:g}s deadline"
        else:
            state, error = outcome.state, outcome.error
        with self._lock:
            first_report = not probe.reported
            probe.reported = True
        if first_report:
            if error is not None:
                self._throttle.warn(name, f"host {name}: unavailable: {error}")
            elif state.role is None:
                self._throttle.warn(name, f"host {name}: unavailable")
            else:
                self._throttle.clear(name)
            self._note_role(name, state.role)
            if state.role is not None and self.max_standby_staleness_seconds is not None:
                # Otherwise the only sign would be every standby failing its check.
                key = f"heartbeat-read:{name}"
                if state.heartbeat_error is not None:
                    self._throttle.warn(key, f"host {name}: heartbeat unknown, so its staleness: "
                                             f"{state.heartbeat_error}")
                else:
                    self._throttle.clear(key)
        return state

    def _note_role(self, name: str, role: Role | None) -> None:
        with self._lock:
            before = self._roles.get(name, "unknown")
            self._roles[name] = role
        if before != role:
            log.info("host %s: %s -> %s", name, before or "unavailable", role or "unavailable")

    # -- routing

    def staleness(self, name: str, states: Mapping[str, HostState],
                  members: Iterable[str]) -> tuple[float | None, str]:
        """(seconds, "") since the newest heartbeat ``name`` has replayed was written, or (None,
        why) when unknown. ``states`` is a scan of ``members``, the group ``name`` is measured in.

        The heartbeat is a timestamp of the primary's clock; the primary's offset (its clock
        minus the Detector's) turns it into the Detector's time, and the age is taken there. No
        other host's clock counts. The offset is that of the group's last single primary, so it
        holds while a failover leaves the group without one."""
        state = states.get(name, UNAVAILABLE)
        if state.role is None:
            return None, "unavailable"
        if state.heartbeat_error is not None:
            return None, state.heartbeat_error
        if state.heartbeat is None:
            return None, f"no heartbeat in {HEARTBEAT_TABLE} yet"
        with self._lock:
            reference = self._references.get(tuple(sorted(set(members))))
        if reference is None:
            return None, "no primary seen yet to measure the heartbeat against"
        _, offset = reference
        written_at = state.heartbeat - offset  # on the Detector's clock
        # Slightly negative when a write lands between the primary's probe and this host's.
        return max(0.0, self._clock.monotonic() - written_at), ""

    def _standby_ok(self, name: str, states: Mapping[str, HostState], members: Iterable[str]) -> bool:
        state = states[name]
        if state.role != "standby":
            return False
        # An unknown lag or staleness cannot be shown to be within the limit the operator asked for.
        if self.max_standby_lag_bytes is not None and (
                state.lag_bytes is None or state.lag_bytes > self.max_standby_lag_bytes):
            return False
        if self.max_standby_staleness_seconds is not None:
            age, _ = self.staleness(name, states, members)
            return age is not None and age <= self.max_standby_staleness_seconds
        return True

    def _availability(self, name: str, params: Mapping[str, str]) -> tuple[int, Any]:
        """pgroute66's /v1/<name>/availability: the heartbeat's age on <name> against ?limit=."""
        raw = params.get("limit")
        if raw is None:
            limit = AVAILABILITY_LIMIT_S
        elif raw == "":
            limit = -1  # pgroute66's "no limit"
        elif re.fullmatch(r"[+-]?[0-9]+", raw):
            limit = int(raw)
        else:
            return 417, f"invalid limit {raw!r}: an integer number of seconds"
        group = params.get("group")
        members = self.members(group)
        if members is None or name not in members:
            return 417, f"{name} is not in group {group!r}"
        states = self.scan_hosts(members, group_scan=True)
        age, why = self.staleness(name, states, members)
        if age is None:
            return 417, why
        seconds = int(age)
        if 0 <= limit < seconds:
            # pgroute66's text, unit and all: the numbers are seconds.
            return 408, f"exceeded (exceeded {limit} by {seconds} msec)"
        return 200, "ok"

    def route(self, path: str, query: Mapping[str, str] | str | None = None) -> tuple[int, Any]:
        """(HTTP status, JSON-serialisable body) for a GET of path?query."""
        if isinstance(query, str):
            params = query_params(query)
        else:
            params = dict(query or {})
        group = params.get("group")  # None: not given (every host); "" is a group name like any other
        parts = [unquote(p) for p in path.strip("/").split("/")]

        if parts == ["healthz"]:
            return 200, "ok"
        if len(parts) < 2 or parts[0] != "v1":
            return 404, "not found"

        if len(parts) == 2 and parts[1] in ("primary", "primaries", "standbys"):
            states = self.scan(group)
            if parts[1] == "standbys":
                return 200, sorted(n for n, s in states.items() if s.role == "standby")
            primaries = sorted(n for n, s in states.items() if s.role == "primary")
            if parts[1] == "primaries":
                return 200, primaries
            if len(primaries) == 1:
                return 200, primaries[0]
            return (404, "") if not primaries else (409, "")

        if len(parts) == 3 and parts[1] in ("primary", "standby"):
            name = parts[2]
            if name not in self.hosts:
                return 404, "invalid"
            members = self.members(group)
            if members is None or name not in members:
                return 503, ""
            if parts[1] == "primary":
                # Fail closed on split brain: the whole group must show exactly this one primary.
                states = self.scan_hosts(members, group_scan=True)
                primaries = [n for n, s in states.items() if s.role == "primary"]
                return (200, name) if primaries == [name] else (503, "")
            if self.max_standby_staleness_seconds is None:
                states = self.scan_hosts([name])
            else:
                # The group's primary gives the clock the heartbeat's age is measured on.
                states = self.scan_hosts(members, group_scan=True)
            return (200, name) if self._standby_ok(name, states, members) else (503, "")

        if len(parts) == 3 and parts[2] == "availability":
            name = parts[1]
            if name not in self.hosts:
                return 417, "invalid"
            return self._availability(name, params)

        if len(parts) == 3 and parts[2] == "status":
            name = parts[1]
            if name not in self.hosts:
                return 404, "invalid"
            state = self.scan_hosts([name])[name]
            return (200, state.role) if state.role else (422, "unavailable")

        return 404, "not found"


def query_params(query: str) -> dict[str, str]:
    """A query string as pgroute66 sees it (Go's url.ParseQuery, then gin's first value per key)."""
    params: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair or ";" in pair:
            continue  # Go refuses semicolons as separators since 1.17 and skips the pair
        key, _, value = pair.partition("=")
        if _BAD_ESCAPE.search(key) or _BAD_ESCAPE.search(value):
            continue
        params.setdefault(unquote_plus(key), unquote_plus(value))
    return params


# --------------------------------------------------------------------------- psycopg prober


# The heartbeat's SQL. Timestamps are UTC (the column has no time zone) whatever TimeZone a
# session has; extract(epoch ...) reads them back as Unix seconds.
HEARTBEAT_READABLE = f"has_table_privilege(to_regclass('{HEARTBEAT_TABLE}'), 'select')"
HEARTBEAT_READ = f"select extract(epoch from max(pgr66_avc)) from {HEARTBEAT_TABLE}"
# One statement whether or not the row exists yet (the build inserts it; a second router may be
# writing too: both then update every row, and readers take the newest).
HEARTBEAT_WRITE = (
    f"with updated as (update {HEARTBEAT_TABLE} set pgr66_avc = clock_timestamp() at time zone 'UTC' "
    f"returning 1) insert into {HEARTBEAT_TABLE} (pgr66_avc) "
    "select clock_timestamp() at time zone 'UTC' where not exists (select from updated)"
)


class PsycopgProber:
    """probe(name) over one persistent autocommit connection per host; heartbeat(name) over another.

    ``with_heartbeat``: each probe also reads the host's clock and the heartbeat row (a second
    statement, only when the table exists and may be read: a missing table writes no error to the
    server's log on every probe).
    """

    def __init__(self, hosts: Mapping[str, Mapping[str, str]], *, query_timeout: float = 1.0,
                 with_lag: bool = False, with_heartbeat: bool = False) -> None:
        import psycopg  # lazily: the module must import without it
        from psycopg.conninfo import make_conninfo

        self._psycopg = psycopg
        self.query_timeout = query_timeout
        # One round trip; on a primary the receive LSN is NULL, so the diff is NULL too.
        columns = ["pg_is_in_recovery()"]
        if with_lag:
            columns.append("pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())")
        if with_heartbeat:
            columns += ["extract(epoch from clock_timestamp())", HEARTBEAT_READABLE]
        self._with_lag, self._with_heartbeat = with_lag, with_heartbeat
        self._sql = "select " + ", ".join(columns)
        self._conninfo: dict[str, str] = {}
        self._writer_conninfo: dict[str, str] = {}
        for name, configured in hosts.items():
            params = dict(configured)
            params.setdefault("connect_timeout", "2")
            params.setdefault("application_name", APPLICATION_NAME)
            # Server side: a query stuck on a lock or a slow disk is cut at the deadline.
            timeout_opt = f"-c statement_timeout={max(1, int(query_timeout * 1000))}"
            params["options"] = f"{params['options']} {timeout_opt}" if params.get("options") else timeout_opt
            # Client side: unacknowledged data (dead network, powered-off host) errors out
            # instead of blocking a worker for the kernel's ~15 minute retransmission limit.
            params.setdefault("tcp_user_timeout", str(max(1000, int(2 * query_timeout * 1000))))
            params.setdefault("keepalives", "1")
            params.setdefault("keepalives_idle", "10")
            params.setdefault("keepalives_interval", "2")
            params.setdefault("keepalives_count", "3")
            # The heartbeat never waits for a synchronous standby (one that is down would hold
            # every write until statement_timeout).
            writer = {**params, "options": f"{params['options']} -c synchronous_commit=local"}
            try:
                self._conninfo[name] = make_conninfo("", **params)
                self._writer_conninfo[name] = make_conninfo("", **writer)
            except psycopg.ProgrammingError as exc:
                raise ConfigError(f"hosts.{name}: {exc}") from None
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._locks = {name: threading.Lock() for name in self._conninfo}
        self._writers: dict[str, psycopg.Connection[Any]] = {}
        self._writer_locks = {name: threading.Lock() for name in self._conninfo}

    def conninfo(self, name: str, *, writer: bool = False) -> str:
        return (self._writer_conninfo if writer else self._conninfo)[name]

    def __call__(self, name: str) -> HostState:
        lock = self._locks[name]
        # The Detector never overlaps probes of one host; refuse rather than share a connection.
        if not lock.acquire(blocking=False):
            raise RuntimeError("previous probe of this host is still running")
        try:
            conn = self._conns.get(name)
            if conn is not None and not conn.closed:
                try:
                    return self._query(conn)
                except self._psycopg.OperationalError:
                    lost = conn.broken
                    self._discard(self._conns, name)
                    # A reused connection may have died with a server restart; one fresh try
                    # saves a spurious "unavailable". A live but slow server gets no retry.
                    if not lost:
                        raise
                except Exception:
                    self._discard(self._conns, name)
                    raise
            conn = self._psycopg.connect(self._conninfo[name], autocommit=True)
            self._conns[name] = conn
            try:
                return self._query(conn)
            except Exception:
                self._discard(self._conns, name)
                raise
        finally:
            lock.release()

    def heartbeat(self, name: str) -> None:
        """Set the heartbeat row on ``name`` (the primary) to its clock; raises on failure."""
        lock = self._writer_locks[name]
        # The Detector never overlaps writes to one host.
        if not lock.acquire(blocking=False):
            raise RuntimeError("previous heartbeat write to this host is still running")
        try:
            conn = self._writers.get(name)
            if conn is None or conn.closed:
                conn = self._psycopg.connect(self._writer_conninfo[name], autocommit=True)
                self._writers[name] = conn
            try:
                conn.execute(HEARTBEAT_WRITE)
            except Exception:
                self._discard(self._writers, name)  # the next interval tries a fresh one
                raise
        finally:
            lock.release()

    def _query(self, conn: psycopg.Connection[Any]) -> HostState:
        started = time.monotonic()
        row = conn.execute(self._sql).fetchone()
        if row is None:
            raise RuntimeError("pg_is_in_recovery() returned no row")
        values = list(row)
        in_recovery = values.pop(0)
        lag = values.pop(0) if self._with_lag else None
        clock = heartbeat = error = None
        if self._with_heartbeat:
            host_clock, readable = values
            clock = float(host_clock)
            if readable is None:
                error = f"table {HEARTBEAT_TABLE} does not exist"
            elif not readable:
                error = f"permission denied for table {HEARTBEAT_TABLE}"
            else:
                try:
                    value = conn.execute(HEARTBEAT_READ).fetchone()
                except self._psycopg.ProgrammingError as exc:  # dropped or revoked just now
                    error = " ".join(str(exc).split())
                else:
                    heartbeat = float(value[0]) if value and value[0] is not None else None
        elapsed = time.monotonic() - started
        if elapsed > self.query_timeout:
            # The Detector already gave up on this answer; a connection this slow is suspect,
            # so the caller discards it.
            raise TimeoutError(f"query took {elapsed:.2f}s (deadline {self.query_timeout:g}s)")
        if not in_recovery:
            return HostState("primary", None, clock, heartbeat, error)
        return HostState("standby", int(lag) if lag is not None else None, clock, heartbeat, error)

    @staticmethod
    def _discard(conns: dict[str, psycopg.Connection[Any]], name: str) -> None:
        conn = conns.pop(name, None)
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the real error
                log.debug("host %s: close failed: %s", name, exc)

    def close(self) -> None:
        for conns in (self._conns, self._writers):
            for name in list(conns):
                self._discard(conns, name)


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server_version = f"bouwsteen-primary-detector/{VERSION}"
    protocol_version = "HTTP/1.1"  # keep-alive for clients that want it
    timeout = 30  # an idle keep-alive connection must not hold a thread forever
    detector: Detector  # set on the per-server subclass

    def _respond(self, with_body: bool) -> None:
        url = urlsplit(self.path)
        try:
            status, body = self.detector.route(url.path, url.query)
        except Exception:
            log.exception("internal error on %s", self.path)
            status, body = 500, "internal error"
        payload = (json.dumps(body, indent=4) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if with_body:
            self.wfile.write(payload)

    def do_GET(self) -> None:  # name fixed by BaseHTTPRequestHandler
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        # HAProxy checks every 2 s per server; access logs at info would flood the journal.
        log.debug("%s %s", self.address_string(), format % args)


def _address_family(bind: str, port: int) -> socket.AddressFamily:
    if not bind:
        return socket.AF_INET
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve bind address {bind!r}: {exc}") from None
    families = [info[0] for info in infos]
    # "localhost" may resolve to ::1 first; HAProxy checks 127.0.0.1, so prefer IPv4.
    return socket.AF_INET if socket.AF_INET in families else families[0]


def make_server(detector: Detector, bind: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"detector": detector})
    server_cls = type("Server", (ThreadingHTTPServer,), {
        "address_family": _address_family(bind, port),
        "daemon_threads": True,
        "allow_reuse_address": True,
    })
    return server_cls((bind, port), handler)


# --------------------------------------------------------------------------- main


def _setup_logging(level: str, logfile: str | None) -> None:
    root = logging.getLogger()
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        # journald adds timestamps itself.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(_LOGLEVELS[level])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="primary_detector",
                                     description="Tell HAProxy which PostgreSQL host is primary.")
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="YAML config file")
    parser.add_argument("-d", "--debug", action="store_true", help="debug logging")
    parser.add_argument("-v", "--version", action="store_true", help="print version and exit")
    args = parser.parse_args(argv)
    if args.version:
        print(f"primary_detector {VERSION}")
        return 0

    try:
        config = load_config(args.config)
        prober = PsycopgProber(config.hosts, query_timeout=config.query_timeout,
                               with_lag=config.max_standby_lag_bytes is not None, with_heartbeat=True)
    except ConfigError as exc:
        print(f"primary_detector: {args.config}: {exc}", file=sys.stderr)
        return 1

    try:
        _setup_logging("debug" if args.debug else config.loglevel, config.logfile)
    except OSError as exc:
        print(f"primary_detector: cannot open logfile: {exc}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        log.warning("%s", warning)

    detector = Detector(config.hosts, config.groups, prober, query_timeout=config.query_timeout,
                        cache_ms=config.cache_ms, max_standby_lag_bytes=config.max_standby_lag_bytes,
                        max_standby_staleness_seconds=config.max_standby_staleness_seconds,
                        heartbeat=prober.heartbeat)
    try:
        server = make_server(detector, config.bind, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.bind, config.port, exc)
        detector.close()
        prober.close()
        return 2

    def stop(signum: int, _frame: Any) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, which runs in this (main) thread.
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("primary_detector %s listening on %s:%s (%d hosts, %d groups)",
             VERSION, host, port, len(config.hosts), len(config.groups))
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        detector.close()
        prober.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
