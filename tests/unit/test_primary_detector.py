"""tasks/programs/primary_detector.py: config, routes, parallel scan, cache, HTTP server.

No PostgreSQL: the Detector gets a fake probe; the psycopg prober is only pointed at a closed port.
Deadlines and cache windows run on a FakeClock that only the test moves (with a FakeExecutor that
runs probes in the test's own thread, so nothing answers behind its back); the tests that need real
threads wait for events, each with a generous deadline, and never measure the wall clock.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tasks.programs import primary_detector as pd
from tasks.programs.primary_detector import (
    ConfigError,
    Detector,
    HostState,
    PsycopgProber,
    main,
    make_server,
    parse_config,
)

MODULE_PATH = Path(pd.__file__)
P = HostState("primary")
S = HostState("standby", 0)
DOWN_STATE = HostState(None)
# How long a test waits for another thread at most: only a broken test ever gets near it.
PATIENCE = 30.0


def S_lag(lag: int | None) -> HostState:
    return HostState("standby", lag)


class Boom(Exception):
    pass


class FakeProbe:
    """states: name -> HostState, or an Exception to raise; before(name) runs first (to block)."""

    def __init__(self, states: Mapping[str, Any], before: Callable[[str], None] | None = None) -> None:
        self.states = dict(states)
        self.before = before
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> HostState:
        with self._lock:
            self.calls[name] += 1
        if self.before is not None:
            self.before(name)
        result = self.states[name]
        if isinstance(result, Exception):
            raise result
        return result


class FakeClock(pd.Clock):
    """Time that moves only when the test moves it, or when the Detector waits for a probe.

    Paired with a FakeExecutor, which holds every probe that has not answered yet: a wait then
    moves the time on to that probe's answer, or to the end of the timeout if it answers later.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []  # the timeout of every wait the Detector began
        self.executor = FakeExecutor(self)
        # Called once, at the start of the next wait: what happens while the Detector waits.
        self.during_next_wait: Callable[[], None] | None = None

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self._run_until(self.now + seconds)

    def wait(self, future: concurrent.futures.Future[Any], timeout: float) -> None:
        self.waits.append(timeout)
        end = self.now + timeout
        meanwhile, self.during_next_wait = self.during_next_wait, None
        if meanwhile is not None:
            meanwhile()
        self._run_until(end, until_done=future)

    def _run_until(self, end: float, until_done: concurrent.futures.Future[Any] | None = None) -> None:
        while until_done is None or not until_done.done():
            due = self.executor.next_due()
            if due is None or due > end:
                break
            self.now = max(self.now, due)
            self.executor.run_due(self.now)
        if until_done is None or not until_done.done():
            self.now = max(self.now, end)


class FakeExecutor(concurrent.futures.Executor):
    """The Detector's probe pool, in the test's thread and on the FakeClock's time.

    A host's probe answers `durations[host]` seconds after it was started (0, the default: at
    once; math.inf: it hangs until finish(host)). `started` counts the probes the Detector began.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.durations: dict[str, float] = {}
        self.started: Counter[str] = Counter()
        self._pending: dict[str, tuple[float, Callable[[str], Any], concurrent.futures.Future[Any]]] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        (name,) = args
        assert name not in self._pending, f"a second probe of {name} while one runs"  # single flight
        self.started[name] += 1
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        duration = self.durations.get(name, 0.0)
        if duration <= 0:
            future.set_result(fn(name))
        else:
            self._pending[name] = (self.clock.now + duration, fn, future)
        return future

    def next_due(self) -> float | None:
        finite = [due for due, _, _ in self._pending.values() if due != math.inf]
        return min(finite, default=None)

    def run_due(self, now: float) -> None:
        for name in sorted(n for n, (due, _, _) in self._pending.items() if due <= now):
            self.finish(name)

    def finish(self, name: str) -> None:
        """The probe of `name` answers now (with whatever probe.states says by then)."""
        _, fn, future = self._pending.pop(name)
        future.set_result(fn(name))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pending.clear()


def timed(states: Mapping[str, Any], groups: Mapping[str, list[str]] | None = None,
          durations: Mapping[str, float] | None = None,
          **kwargs: Any) -> tuple[Detector, FakeProbe, FakeClock]:
    """A Detector on fake time; the clock's executor is its probe pool."""
    kwargs.setdefault("cache_ms", 0)
    clock = FakeClock()
    clock.executor.durations.update(durations or {})
    probe = FakeProbe(states)
    det = Detector(list(states), groups or {}, probe, clock=clock, executor=clock.executor, **kwargs)
    return det, probe, clock


def detector(states: Mapping[str, Any], groups: Mapping[str, list[str]] | None = None,
             **kwargs: Any) -> Detector:
    kwargs.setdefault("cache_ms", 0)
    return Detector(list(states), groups or {}, FakeProbe(states), **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MINIMAL = """
hosts:
  db1: {host: db1.example, port: 5432, user: pgroute66, dbname: postgres, connect_timeout: 2}
  db2: {host: db2.example, port: 5432, user: pgroute66, dbname: postgres, connect_timeout: 2}
groups:
  pgcluster: [db1, db2]
bind: 127.0.0.1
port: 8080
"""


# --------------------------------------------------------------------------- config


def test_minimal_pgroute66_config_parses_with_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert sorted(cfg.hosts) == ["db1", "db2"]
    assert cfg.hosts["db1"] == {"host": "db1.example", "port": "5432", "user": "pgroute66",
                                "dbname": "postgres", "connect_timeout": "2"}
    assert cfg.groups == {"pgcluster": ["db1", "db2"]}
    assert (cfg.bind, cfg.port, cfg.loglevel) == ("127.0.0.1", 8080, "info")
    assert (cfg.query_timeout, cfg.cache_ms, cfg.max_standby_lag_bytes) == (1.0, 200, None)
    assert cfg.warnings == ()


def test_defaults_for_bind_port_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    cfg = parse_config("hosts: {db1: {port: 5433}, db2: }")
    assert (cfg.bind, cfg.port, cfg.groups) == ("localhost", 8080, {})
    assert cfg.hosts == {"db1": {"port": "5433", "host": "localhost"}, "db2": {"host": "localhost"}}


def test_extras_are_parsed() -> None:
    cfg = parse_config(MINIMAL + "query_timeout: 0.5\ncache_ms: 0\nmax_standby_lag_bytes: 1048576\n"
                       "loglevel: DEBUG\n")
    assert (cfg.query_timeout, cfg.cache_ms, cfg.max_standby_lag_bytes, cfg.loglevel) == (
        0.5, 0, 1048576, "debug")


def test_b64password_is_decoded_into_password() -> None:
    secret = "s3cr=t 'quoted'"
    b64 = base64.b64encode(secret.encode()).decode()
    cfg = parse_config(f"hosts: {{db1: {{host: h, b64password: '{b64}'}}}}")
    assert cfg.hosts["db1"] == {"host": "h", "password": secret}


def test_yaml_booleans_become_libpq_flags() -> None:
    cfg = parse_config("hosts: {db1: {host: h, sslcompression: on, keepalives: off}}")
    assert cfg.hosts["db1"]["sslcompression"] == "1"
    assert cfg.hosts["db1"]["keepalives"] == "0"


def test_unknown_keys_and_pool_keys_warn() -> None:
    cfg = parse_config("hosts: {db1: {host: h, pool_max_conns: 4}}\nverbosity: 3\nssl: {}\n")
    assert cfg.hosts["db1"] == {"host": "h"}
    assert any("verbosity" in w for w in cfg.warnings)
    assert any("pool_max_conns" in w for w in cfg.warnings)
    assert any(w.startswith("ssl:") for w in cfg.warnings)


def test_host_groups_is_flagged() -> None:
    cfg = parse_config("hosts: {db1: {host: h}}\nhost_groups: {pgcluster: [db1]}\n")
    assert cfg.groups == {}
    assert any("host_groups" in w and "groups:" in w for w in cfg.warnings)


@pytest.mark.parametrize("name", sorted(pd.RESERVED_HOST_NAMES))
def test_reserved_host_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"host name '{name}' is reserved"):
        parse_config(f"hosts: {{{name}: {{host: h}}, db1: {{host: h}}}}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hosts: {db1: {host: h}\n", "invalid YAML"),
        ("hosts: [unclosed", "invalid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
        ("bind: 127.0.0.1\n", "hosts: must be a non-empty mapping"),
        ("hosts: {}\n", "hosts: must be a non-empty mapping"),
        ("hosts: [db1, db2]\n", "hosts: must be a non-empty mapping"),
        ("hosts: {db1: [h]}\n", "hosts.db1 must be a mapping"),
        ("hosts: {db1: {host: [a, b]}}\n", "hosts.db1.host must be a scalar"),
        ("hosts: {db1: {b64password: '!!notbase64'}}\n", "not valid base64"),
        ("hosts: {'a/b': {host: h}}\n", "cannot be used in a URL path"),
        ("hosts: {db1: {host: h}}\ngroups: {g: [db1, db9]}\n", "unknown hosts: db9"),
        ("hosts: {db1: {host: h}}\ngroups: {g: db1}\n", "must be a list"),
        ("hosts: {db1: {host: h}}\ngroups: [db1]\n", "groups: must be a mapping"),
        ("hosts: {db1: {host: h}}\ngroups: {all: [db1]}\n", "'all' is reserved"),
        ("hosts: {db1: {host: h}}\nport: http\n", "port must be an integer"),
        ("hosts: {db1: {host: h}}\nport: 70000\n", "port must be <= 65535"),
        ("hosts: {db1: {host: h}}\nbind: [a]\n", "bind must be a string"),
        ("hosts: {db1: {host: h}}\nquery_timeout: 0\n", "query_timeout must be > 0"),
        ("hosts: {db1: {host: h}}\nquery_timeout: fast\n", "query_timeout must be a number"),
        ("hosts: {db1: {host: h}}\ncache_ms: -1\n", "cache_ms must be >= 0"),
        ("hosts: {db1: {host: h}}\ncache_ms: 0.5\n", "cache_ms must be an integer"),
        ("hosts: {db1: {host: h}}\nmax_standby_lag_bytes: lots\n", "max_standby_lag_bytes must be an integer"),
        ("hosts: {db1: {host: h}}\nssl: {b64cert: eA==, b64key: eA==}\n", "TLS\\) is not supported"),
    ],
)
def test_invalid_config_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


# --------------------------------------------------------------------------- main / CLI


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v"]) == 0
    assert capsys.readouterr().out.strip() == f"primary_detector {pd.VERSION}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read"),
        ("hosts: {db1: {host: h}\n", "invalid YAML"),
        ("hosts: {standbys: {host: h}}\n", "'standbys' is reserved"),
        ("groups: {g: []}\n", "hosts: must be a non-empty mapping"),
        ("hosts: {db1: {host: h, no_such_libpq_option: 1}}\n", 'invalid connection option "no_such_libpq_option"'),
    ],
)
def test_main_invalid_config_exits_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       text: str | None, message: str) -> None:
    path = tmp_path / "primary-detector.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"primary_detector: {path}: ")
    assert message in err


# --------------------------------------------------------------------------- routes

ONE = {"db1": P, "db2": S_lag(0), "db3": S_lag(5000)}
NONE = {"db1": S, "db2": S}
SPLIT = {"db1": P, "db2": P, "db3": S}
DOWN = {"db1": Boom("connection refused"), "db2": P, "db3": S}
GROUPS = {"a": ["db1", "db2"], "b": ["db3", "db4"]}
TWO_CLUSTERS = {"db1": P, "db2": S, "db3": P, "db4": S}


@pytest.mark.parametrize(
    ("states", "groups", "path", "query", "status", "body"),
    [
        # exactly one primary
        (ONE, None, "/v1/primary", None, 200, "db1"),
        (ONE, None, "/v1/primary/", None, 200, "db1"),
        (ONE, None, "/v1/primaries", None, 200, ["db1"]),
        (ONE, None, "/v1/standbys", None, 200, ["db2", "db3"]),
        (ONE, None, "/v1/db1/status", None, 200, "primary"),
        (ONE, None, "/v1/db2/status", None, 200, "standby"),
        (ONE, None, "/v1/nope/status", None, 404, "invalid"),
        (ONE, None, "/v1/primary/db1", None, 200, "db1"),
        (ONE, None, "/v1/primary/db2", None, 503, ""),
        (ONE, None, "/v1/primary/nope", None, 404, "invalid"),
        (ONE, None, "/v1/standby/db2", None, 200, "db2"),
        (ONE, None, "/v1/standby/db3", None, 200, "db3"),  # no lag limit configured
        (ONE, None, "/v1/standby/db1", None, 503, ""),
        (ONE, None, "/v1/standby/nope", None, 404, "invalid"),
        (ONE, None, "/v1/db1/availability", None, 501,
         "not implemented: use /v1/standby/<name> with max_standby_lag_bytes"),
        (ONE, None, "/v1/nope/availability", None, 404, "invalid"),
        (ONE, None, "/healthz", None, 200, "ok"),
        (ONE, None, "/", None, 404, "not found"),
        (ONE, None, "/v1/bogus", None, 404, "not found"),
        (ONE, None, "/v2/primary", None, 404, "not found"),
        (ONE, None, "/v1/db1/status/extra", None, 404, "not found"),
        (ONE, None, "/v1/%64b1/status", None, 200, "primary"),  # percent-encoded name
        # no primary
        (NONE, None, "/v1/primary", None, 404, ""),
        (NONE, None, "/v1/primaries", None, 200, []),
        (NONE, None, "/v1/primary/db1", None, 503, ""),
        (NONE, None, "/v1/standbys", None, 200, ["db1", "db2"]),
        # split brain: fail closed
        (SPLIT, None, "/v1/primary", None, 409, ""),
        (SPLIT, None, "/v1/primaries", None, 200, ["db1", "db2"]),
        (SPLIT, None, "/v1/primary/db1", None, 503, ""),
        (SPLIT, None, "/v1/primary/db2", None, 503, ""),
        (SPLIT, None, "/v1/db1/status", None, 200, "primary"),
        (SPLIT, None, "/v1/standby/db3", None, 200, "db3"),
        # an unavailable host is neither primary nor standby
        (DOWN, None, "/v1/primary", None, 200, "db2"),
        (DOWN, None, "/v1/primary/db2", None, 200, "db2"),
        (DOWN, None, "/v1/db1/status", None, 422, "unavailable"),
        (DOWN, None, "/v1/primaries", None, 200, ["db2"]),
        (DOWN, None, "/v1/standbys", None, 200, ["db3"]),
        (DOWN, None, "/v1/primary/db1", None, 503, ""),
        (DOWN, None, "/v1/standby/db1", None, 503, ""),
        ({"db1": Boom("x"), "db2": Boom("y")}, None, "/v1/primary", None, 404, ""),
        ({"db1": Boom("x"), "db2": Boom("y")}, None, "/v1/standbys", None, 200, []),
        # groups
        (TWO_CLUSTERS, GROUPS, "/v1/primary", None, 409, ""),  # "all" sees both clusters
        (TWO_CLUSTERS, GROUPS, "/v1/primary", {"group": "a"}, 200, "db1"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=b", 200, "db3"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", {"group": "all"}, 409, ""),
        # an empty ?group= is an undefined group, as in pgroute66 (gin defaults only a missing key)
        (TWO_CLUSTERS, GROUPS, "/v1/primary", {"group": ""}, 404, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/primaries", {"group": ""}, 200, []),
        (TWO_CLUSTERS, GROUPS, "/v1/standbys", {"group": ""}, 200, []),
        (TWO_CLUSTERS, GROUPS, "/v1/primary/db1", {"group": ""}, 503, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/standby/db2", {"group": ""}, 503, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/db1/status", {"group": ""}, 200, "primary"),  # group ignored
        (ONE, None, "/v1/primary", "group=", 404, ""),
        (ONE, None, "/v1/primary", "group", 404, ""),  # a key without '=' is present and empty
        (ONE, None, "/v1/primary/db1", "group=", 503, ""),
        (ONE, None, "/v1/primary", "", 200, "db1"),
        (ONE, None, "/v1/primary", "other=x", 200, "db1"),
        # the query string as Go's url.ParseQuery reads it, gin's first value per key
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=a&group=b", 200, "db1"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=&group=a", 404, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=%62", 200, "db3"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=a;x", 409, ""),  # pair dropped: every host
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "group=%zz&x=1", 409, ""),  # bad escape: dropped
        (TWO_CLUSTERS, GROUPS, "/v1/primary", "x=%zz&group=b", 200, "db3"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary", {"group": "zzz"}, 404, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/primaries", {"group": "zzz"}, 200, []),
        (TWO_CLUSTERS, GROUPS, "/v1/standbys", {"group": "zzz"}, 200, []),
        (TWO_CLUSTERS, GROUPS, "/v1/standbys", {"group": "b"}, 200, ["db4"]),
        (TWO_CLUSTERS, GROUPS, "/v1/primaries", None, 200, ["db1", "db3"]),
        (TWO_CLUSTERS, GROUPS, "/v1/primary/db3", {"group": "b"}, 200, "db3"),
        (TWO_CLUSTERS, GROUPS, "/v1/primary/db3", None, 503, ""),  # two primaries in "all"
        (TWO_CLUSTERS, GROUPS, "/v1/primary/db1", {"group": "b"}, 503, ""),  # not a member
        (TWO_CLUSTERS, GROUPS, "/v1/primary/db1", {"group": "zzz"}, 503, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/standby/db2", {"group": "a"}, 200, "db2"),
        (TWO_CLUSTERS, GROUPS, "/v1/standby/db2", {"group": "b"}, 503, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/standby/db2", {"group": "zzz"}, 503, ""),
        (TWO_CLUSTERS, GROUPS, "/v1/db3/status", {"group": "a"}, 200, "primary"),  # group ignored
    ],
)
def test_route(states: Mapping[str, Any], groups: Mapping[str, list[str]] | None, path: str,
               query: Mapping[str, str] | str | None, status: int, body: Any) -> None:
    det = detector(states, groups)
    try:
        assert det.route(path, query) == (status, body)
    finally:
        det.close()


LAGGY = {"db1": P, "db2": S_lag(0), "db3": S_lag(1000), "db4": S_lag(1001), "db5": S_lag(None)}


@pytest.mark.parametrize(
    ("limit", "name", "status"),
    [
        (1000, "db2", 200),
        (1000, "db3", 200),  # the limit is inclusive
        (1000, "db4", 503),
        (1000, "db5", 503),  # unknown lag cannot be shown to be within the limit
        (1000, "db1", 503),
        (None, "db4", 200),
        (None, "db5", 200),
        (0, "db2", 200),
        (0, "db3", 503),
    ],
)
def test_standby_lag_limit(limit: int | None, name: str, status: int) -> None:
    det = detector(LAGGY, max_standby_lag_bytes=limit)
    try:
        assert det.route(f"/v1/standby/{name}")[0] == status
        # /v1/standbys stays pgroute66-compatible: every reachable standby, lag or not.
        assert det.route("/v1/standbys") == (200, ["db2", "db3", "db4", "db5"])
    finally:
        det.close()


def test_probe_returning_garbage_counts_as_unavailable() -> None:
    det = Detector(["db1"], {}, lambda name: "primary", cache_ms=0)  # type: ignore[arg-type,return-value]
    try:
        assert det.route("/v1/db1/status") == (422, "unavailable")
    finally:
        det.close()


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("", {}),
        ("group=lab", {"group": "lab"}),
        ("group=", {"group": ""}),
        ("group", {"group": ""}),
        ("group=a&group=b", {"group": "a"}),
        ("group=a+b%2Fc", {"group": "a b/c"}),
        ("group=a;b", {}),
        ("group=a&x=1;y=2", {"group": "a"}),
        ("group=%zz", {}),
        ("group=%4", {}),
        ("&&group=a&", {"group": "a"}),
        ("=x", {"": "x"}),
    ],
)
def test_query_params_as_go_parses_them(query: str, params: dict[str, str]) -> None:
    assert pd.query_params(query) == params


def test_group_named_empty_is_used_when_defined() -> None:
    """pgroute66 looks "" up in groups: like any name; only a missing ?group= means all."""
    cfg = parse_config('hosts: {db1: {host: h}, db2: {host: h}}\ngroups: {"": [db2]}\n')
    assert cfg.groups == {"": ["db2"]}
    det = detector({"db1": P, "db2": P}, cfg.groups)
    try:
        assert det.route("/v1/primary", "group=") == (200, "db2")
        assert det.route("/v1/primary") == (409, "")
    finally:
        det.close()


def test_empty_group_warns_with_a_hint(caplog: pytest.LogCaptureFixture) -> None:
    det = detector(ONE)
    try:
        with caplog.at_level(logging.WARNING, logger="primary_detector"):
            assert det.route("/v1/primary", "group=") == (404, "")
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            "hostgroup '' is not defined; treated as empty (an empty ?group= is not 'all': leave it out)"]
    finally:
        det.close()


def test_unknown_group_warns(caplog: pytest.LogCaptureFixture) -> None:
    det = detector(ONE)
    try:
        with caplog.at_level(logging.WARNING, logger="primary_detector"):
            assert det.route("/v1/primary", {"group": "pgclutser"}) == (404, "")
        assert any("pgclutser" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    finally:
        det.close()


def test_probe_errors_warn_with_host_name_once(caplog: pytest.LogCaptureFixture) -> None:
    det = detector(DOWN)
    try:
        with caplog.at_level(logging.DEBUG, logger="primary_detector"):
            det.route("/v1/primary")
            det.route("/v1/primary")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        # An unchanged error is not repeated at warning level on every HAProxy check.
        assert warnings == ["host db1: unavailable: Boom: connection refused"]
        assert any("db2: unknown -> primary" in r.getMessage() for r in caplog.records)
    finally:
        det.close()


# --------------------------------------------------------------------------- parallel scan


def test_scan_runs_hosts_in_parallel() -> None:
    # Real threads: every probe waits until all four are running at once. Run one after another,
    # the first would give up at the barrier (broken after PATIENCE) and the scan would fail.
    names = ["db1", "db2", "db3", "db4"]
    barrier = threading.Barrier(len(names), timeout=PATIENCE)
    probe = FakeProbe({n: S for n in names}, before=lambda name: barrier.wait())
    det = Detector(names, {}, probe, query_timeout=PATIENCE * 2, cache_ms=0)
    try:
        assert det.scan() == {n: S for n in names}
        assert probe.calls == {n: 1 for n in names}
    finally:
        barrier.abort()
        det.close()


def test_a_scan_lasts_as_long_as_its_slowest_host() -> None:
    # Every probe is started before the scan waits for any: 0.2 s in all, not the 0.7 s of their sum.
    durations = {"db1": 0.2, "db2": 0.2, "db3": 0.2, "db4": 0.1}
    det, _, clock = timed({n: S for n in durations}, durations=durations, query_timeout=1.0)
    try:
        assert det.scan() == {n: S for n in durations}
        assert clock.now == 0.2
        assert clock.waits == [1.0]  # one wait, for the first host; the others were in by then
    finally:
        det.close()


def test_slow_host_is_unavailable_and_deadline_holds() -> None:
    det, _, clock = timed({"db1": P, "db2": S, "db3": P}, durations={"db3": math.inf},
                              query_timeout=0.3)
    ex = clock.executor
    try:
        assert det.scan() == {"db1": P, "db2": S, "db3": DOWN_STATE}
        # Waited for the hung host until the deadline and not a moment longer.
        assert (clock.waits, clock.now) == ([0.3], 0.3)
        # The hung host cannot cause split brain: db3 counts as neither.
        assert det.route("/v1/primary") == (200, "db1")
        assert det.route("/v1/db3/status") == (422, "unavailable")

        # While it still hangs it is not probed again (no thread pile-up) and costs no wait.
        assert det.scan()["db3"] == DOWN_STATE
        assert (clock.waits, clock.now) == ([0.3], 0.3)
        assert ex.started["db3"] == 1
        assert ex.started["db1"] == 3  # two scans and /v1/primary; /v1/db3/status asks db3 only

        clock.advance(10)
        ex.durations["db3"] = 0  # from now on it answers at once
        ex.finish("db3")  # the hung probe finishes, far too late to count
        assert det.scan()["db3"] == P  # a fresh probe once the hung one returned; it answers
        assert ex.started["db3"] == 2
    finally:
        det.close()


def test_a_probe_shared_with_an_earlier_scan_is_waited_for_until_its_own_deadline() -> None:
    # Two checks overlap: the second starts 0.75 s into the first and shares its hung probe. It must
    # give up at that probe's deadline (1.0), not a whole query_timeout later (1.75).
    det, _, clock = timed({"db1": P}, durations={"db1": math.inf}, query_timeout=1.0)
    second: list[tuple[int, Any]] = []

    def second_check() -> None:
        clock.advance(0.75)
        second.append(det.route("/v1/db1/status"))
        assert clock.now == 1.0

    clock.during_next_wait = second_check
    try:
        assert det.route("/v1/db1/status") == (422, "unavailable")
        assert second == [(422, "unavailable")]
        assert clock.waits == [1.0, 0.25]
        assert clock.now == 1.0
        assert clock.executor.started["db1"] == 1
    finally:
        det.close()


def test_a_host_unavailable_at_its_last_probe_is_not_waited_for() -> None:
    # After a failover the old primary's host is dead: each new connect attempt hangs. Checks for
    # the new primary must not wait for it every time, and the host counts again once it answers.
    det, probe, clock = timed({"db1": ConnectionError("no route to host"), "db2": P},
                              query_timeout=30)
    ex = clock.executor
    try:
        assert det.scan()["db1"] == DOWN_STATE  # refused at once: now known unavailable
        ex.durations["db1"] = math.inf  # its next connect attempt hangs until finished
        assert det.route("/v1/primary/db2") == (200, "db2")
        assert det.route("/v1/primary/db2") == (200, "db2")
        assert (clock.waits, clock.now) == ([], 0.0)  # no check waited for it at all
        assert ex.started["db1"] == 2  # the hanging probe was started, just not waited for

        probe.states["db1"] = P  # it comes back, still claiming primary
        ex.durations["db1"] = 0
        clock.advance(1)
        ex.finish("db1")
        assert det.route("/v1/primary") == (409, "")  # split brain is seen again
        assert det.route("/v1/primary/db2") == (503, "")
    finally:
        det.close()


def test_the_answer_of_a_host_not_waited_for_counts_from_the_next_scan() -> None:
    # Within the cache window the returning host's own answer is used: no second probe needed.
    det, probe, clock = timed({"db1": ConnectionError("no route to host"), "db2": P},
                              query_timeout=30, cache_ms=1000)
    ex = clock.executor
    try:
        assert det.scan()["db1"] == DOWN_STATE
        clock.advance(2)  # the cached answer expires; the next probe hangs
        ex.durations["db1"] = math.inf
        assert det.route("/v1/primary") == (200, "db2")
        assert det.route("/v1/primary") == (200, "db2")  # still under way: not waited for
        probe.states["db1"] = P
        clock.advance(0.5)
        ex.finish("db1")  # answers well within its deadline
        assert det.route("/v1/primary") == (409, "")
        assert ex.started["db1"] == 2
        assert clock.waits == []
    finally:
        det.close()


def test_late_answer_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    det, probe, clock = timed({"db1": P}, durations={"db1": 0.3}, query_timeout=0.1,
                              cache_ms=60_000)
    try:
        with caplog.at_level(logging.WARNING, logger="primary_detector"):
            assert det.scan() == {"db1": DOWN_STATE}
            assert clock.now == 0.1
            clock.advance(0.4)  # the probe has now returned "primary", but after its deadline
            assert clock.executor.started["db1"] == 1 and probe.calls["db1"] == 1
            assert det.scan() == {"db1": DOWN_STATE}
        assert clock.executor.started["db1"] == 1  # the cached (late) answer, not a new probe
        assert [r.getMessage() for r in caplog.records] == [
            "host db1: unavailable: no answer within 0.1s",
            "host db1: unavailable: answered after the 0.1s deadline",
        ]
    finally:
        det.close()


def test_an_answer_in_time_counts_and_ends_the_wait() -> None:
    det, _, clock = timed({"db1": P, "db2": S}, durations={"db1": 0.25, "db2": 0.05},
                          query_timeout=0.3)
    try:
        assert det.route("/v1/primary") == (200, "db1")
        assert clock.now == 0.25  # the scan ended with the last answer, before the deadline
    finally:
        det.close()


def test_an_unchanged_warning_is_repeated_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    det, probe, clock = timed({"db1": Boom("connection refused")})
    refused, other = "host db1: unavailable: Boom: connection refused", "host db1: unavailable: Boom: other"
    steps: list[tuple[float, Any, int]] = [
        # (seconds later, what db1 answers, level of the log line that scan writes)
        (0, Boom("connection refused"), logging.WARNING),
        (30, Boom("connection refused"), logging.DEBUG),  # unchanged: not repeated yet
        (29, Boom("connection refused"), logging.DEBUG),
        (1, Boom("connection refused"), logging.WARNING),  # 60 s since it was last loud
        (0, Boom("other"), logging.WARNING),  # a changed message is always loud
        (1, P, None),  # it answers: the throttle forgets it
        (1, Boom("other"), logging.WARNING),
    ]
    try:
        for seconds, answer, level in steps:
            clock.advance(seconds)
            probe.states["db1"] = answer
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="primary_detector"):
                det.scan()
            lines = [(r.levelno, r.getMessage()) for r in caplog.records
                     if r.getMessage() in (refused, other)]
            want = [] if level is None else [(level, refused if "refused" in str(answer) else other)]
            assert lines == want, (clock.now, answer)
    finally:
        det.close()


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize(
    ("cache_ms", "pause", "calls"),
    [
        (10_000, 0.0, 1),  # within the window: one probe per host
        (10_000, 9.5, 1),
        (0, 0.0, 2),  # caching off
        (50, 0.15, 2),  # window expired
        (500, 0.5, 2),  # the window ends after exactly cache_ms
    ],
)
def test_cache_window(cache_ms: int, pause: float, calls: int) -> None:
    det, probe, clock = timed({"db1": P, "db2": S}, {"g": ["db1", "db2"]}, cache_ms=cache_ms)
    try:
        det.route("/v1/primary")
        clock.advance(pause)
        det.route("/v1/standbys", {"group": "g"})  # another route and group share the cache
        assert probe.calls == {"db1": calls, "db2": calls}
    finally:
        det.close()


class CountingClock(pd.Clock):
    """The real clock; counts the waits for a probe that have begun."""

    def __init__(self) -> None:
        self.waits_begun = threading.Semaphore(0)

    def wait(self, future: concurrent.futures.Future[Any], timeout: float) -> None:
        self.waits_begun.release()
        super().wait(future, timeout)


def test_concurrent_requests_share_one_scan() -> None:
    # Real threads: the probes answer only once all ten requests are waiting for them.
    release = threading.Event()

    def hold(name: str) -> None:
        if not release.wait(PATIENCE):
            raise AssertionError("never released")

    clock = CountingClock()
    probe = FakeProbe({"db1": P, "db2": S}, before=hold)
    det = Detector(["db1", "db2"], {}, probe, query_timeout=PATIENCE * 2, cache_ms=0, clock=clock)
    results: list[tuple[int, Any]] = []

    def check() -> None:
        results.append(det.route("/v1/primary/db1"))

    threads = [threading.Thread(target=check) for _ in range(10)]
    try:
        for t in threads:
            t.start()
        for _ in threads:  # each request waits for the same, still unanswered probes
            assert clock.waits_begun.acquire(timeout=PATIENCE)
        release.set()
        for t in threads:
            t.join(PATIENCE)
        assert results == [(200, "db1")] * 10
        assert probe.calls == {"db1": 1, "db2": 1}  # even with caching off: single flight
    finally:
        release.set()
        det.close()


# --------------------------------------------------------------------------- psycopg prober


def test_prober_conninfo_carries_timeouts() -> None:
    prober = PsycopgProber({"db1": {"host": "h", "port": "5432"},
                            "db2": {"host": "h", "connect_timeout": "5", "options": "-c search_path=x",
                                    "application_name": "mine", "tcp_user_timeout": "9000"}},
                           query_timeout=0.5)
    one = prober.conninfo("db1")
    for part in ("connect_timeout=2", "application_name=bouwsteen-primary-detector",
                 "options='-c statement_timeout=500'", "tcp_user_timeout=1000", "keepalives=1"):
        assert part in one
    two = prober.conninfo("db2")
    for part in ("connect_timeout=5", "application_name=mine", "tcp_user_timeout=9000",
                 "options='-c search_path=x -c statement_timeout=500'"):
        assert part in two


def test_prober_refuses_unknown_libpq_keyword() -> None:
    with pytest.raises(ConfigError, match="hosts.db1: invalid connection option"):
        PsycopgProber({"db1": {"host": "h", "bogus": "1"}})


def test_prober_against_closed_port_is_unavailable() -> None:
    port = free_port()
    prober = PsycopgProber({"db1": {"host": "127.0.0.1", "port": str(port), "user": "x",
                                    "dbname": "x", "sslmode": "disable"}}, query_timeout=1.0)
    det = Detector(["db1"], {}, prober, query_timeout=1.0, cache_ms=0)
    try:
        assert det.route("/v1/db1/status") == (422, "unavailable")
        assert det.route("/v1/primary") == (404, "")
    finally:
        det.close()
        prober.close()


# --------------------------------------------------------------------------- HTTP


@pytest.fixture
def http_server() -> Iterator[str]:
    probe = FakeProbe({"db1": P, "db2": S_lag(10), "db3": Boom("timeout")})
    det = Detector(["db1", "db2", "db3"], {"pg": ["db1", "db2"]}, probe, cache_ms=200,
                   max_standby_lag_bytes=100)
    server = make_server(det, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        det.close()
        thread.join(5)


def _get(url: str) -> tuple[int, Any, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), resp.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers["Content-Type"]


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/healthz", 200, "ok"),
        ("/v1/primary", 200, "db1"),
        ("/v1/primary?group=pg", 200, "db1"),
        ("/v1/primary?group=nope", 404, ""),
        ("/v1/primary?group=", 404, ""),
        ("/v1/standbys?group=", 200, []),
        ("/v1/primary/db1?group=", 503, ""),
        ("/v1/primaries", 200, ["db1"]),
        ("/v1/standbys?group=pg", 200, ["db2"]),
        ("/v1/db1/status", 200, "primary"),
        ("/v1/db3/status", 422, "unavailable"),
        ("/v1/db9/status", 404, "invalid"),
        ("/v1/primary/db1?group=pg", 200, "db1"),
        ("/v1/primary/db2?group=pg", 503, ""),
        ("/v1/standby/db2?group=pg", 200, "db2"),
        ("/v1/standby/db3", 503, ""),
        ("/nope", 404, "not found"),
    ],
)
def test_http_server(http_server: str, path: str, status: int, body: Any) -> None:
    assert _get(http_server + path) == (status, body, "application/json; charset=utf-8")


def test_http_keepalive_head_and_indent(http_server: str) -> None:
    host, port = http_server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/v1/primaries")
        resp = conn.getresponse()
        assert (resp.status, resp.version) == (200, 11)
        assert resp.read() == b'[\n    "db1"\n]\n'  # gin's IndentedJSON shape
        conn.request("HEAD", "/v1/primary/db2")  # same connection: keep-alive
        resp = conn.getresponse()
        assert resp.status == 503
        assert resp.read() == b""
        conn.request("OPTIONS", "/")  # HAProxy's bare `option httpchk` must not pass
        assert conn.getresponse().status == 501
    finally:
        conn.close()


STDLIB_ONLY = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("primary_detector", sys.argv[1])
    pd = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pd
    spec.loader.exec_module(pd)
    states = {"db1": pd.HostState("primary"), "db2": pd.HostState("standby", 0)}
    det = pd.Detector(states, {}, states.__getitem__, cache_ms=0)
    print(det.route("/v1/primary"), det.route("/v1/standbys"), det.route("/v1/db2/status"))
    det.close()
    print(sorted({"yaml", "psycopg"} & set(sys.modules)))
""")


def test_module_runs_on_the_standard_library_alone(tmp_path: Path) -> None:
    """As uploaded to a router host: a copy outside the project, no site-packages (-I -S)."""
    copy = tmp_path / "primary_detector.py"
    shutil.copyfile(MODULE_PATH, copy)
    isolated = [sys.executable, "-I", "-S"]
    done = subprocess.run([*isolated, str(copy), "-v"], capture_output=True, text=True, timeout=PATIENCE,
                          check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"primary_detector {pd.VERSION}"), done.stderr
    # The Detector with its default clock and thread pool, without yaml or psycopg importable.
    done = subprocess.run([*isolated, "-c", STDLIB_ONLY, str(copy)], capture_output=True, text=True,
                          timeout=PATIENCE, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(200, 'db1') (200, ['db2']) (200, 'standby')", "[]"]


def test_program_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The real entry point, as systemd runs it: config -> psycopg prober -> HTTP, then SIGTERM."""
    port, pg_port = free_port(), free_port()
    config = tmp_path / "primary-detector.yaml"
    config.write_text(
        f"hosts:\n  db1: {{host: 127.0.0.1, port: {pg_port}, user: x, dbname: x, sslmode: disable}}\n"
        f"groups: {{pg: [db1]}}\nbind: 127.0.0.1\nport: {port}\nquery_timeout: 0.5\nfancy: 1\n"
    )
    proc = subprocess.Popen([sys.executable, str(MODULE_PATH), "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                assert _get(base + "/healthz")[:2] == (200, "ok")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert _get(base + "/v1/db1/status")[:2] == (422, "unavailable")
        assert _get(base + "/v1/primary?group=pg")[:2] == (404, "")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=PATIENCE)
        assert proc.returncode == 0, err
        assert "unknown config key 'fancy' ignored" in err
        assert "host db1: unavailable" in err
        assert "received SIGTERM" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
