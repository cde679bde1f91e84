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
from decimal import Decimal
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
    A heartbeat write to a host is keyed "<host>:beat" in both (and for finish).
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.durations: dict[str, float] = {}
        self.started: Counter[str] = Counter()
        self._pending: dict[str, tuple[float, Callable[[str], Any], concurrent.futures.Future[Any]]] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        (name,) = args
        key = name if fn.__name__ == "_run" else f"{name}:{fn.__name__.strip('_')}"
        assert key not in self._pending, f"a second {key} while one runs"  # single flight
        self.started[key] += 1
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        duration = self.durations.get(key, 0.0)
        if duration <= 0:
            future.set_result(fn(name))
        else:
            self._pending[key] = (self.clock.now + duration, fn, future)
        return future

    def next_due(self) -> float | None:
        finite = [due for due, _, _ in self._pending.values() if due != math.inf]
        return min(finite, default=None)

    def run_due(self, now: float) -> None:
        for name in sorted(n for n, (due, _, _) in self._pending.items() if due <= now):
            self.finish(name)

    def finish(self, key: str) -> None:
        """The probe of host `key` (or its write, "<host>:beat") answers now (with whatever
        probe.states says by then)."""
        _, fn, future = self._pending.pop(key)
        future.set_result(fn(key.partition(":")[0]))

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
    assert cfg.max_standby_staleness_seconds is None
    assert cfg.warnings == ()


def test_defaults_for_bind_port_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    cfg = parse_config("hosts: {db1: {port: 5433}, db2: }")
    assert (cfg.bind, cfg.port, cfg.groups) == ("localhost", 8080, {})
    assert cfg.hosts == {"db1": {"port": "5433", "host": "localhost"}, "db2": {"host": "localhost"}}


def test_extras_are_parsed() -> None:
    cfg = parse_config(MINIMAL + "query_timeout: 0.5\ncache_ms: 0\nmax_standby_lag_bytes: 1048576\n"
                       "loglevel: DEBUG\nmax_standby_staleness_seconds: 10\n")
    assert (cfg.query_timeout, cfg.cache_ms, cfg.max_standby_lag_bytes, cfg.loglevel) == (
        0.5, 0, 1048576, "debug")
    assert cfg.max_standby_staleness_seconds == 10.0 and cfg.warnings == ()
    assert parse_config(MINIMAL + "max_standby_staleness_seconds: 2.5").max_standby_staleness_seconds == 2.5


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
        ("hosts: {db1: {host: h}}\nmax_standby_staleness_seconds: lots\n",
         "max_standby_staleness_seconds must be a number"),
        ("hosts: {db1: {host: h}}\nmax_standby_staleness_seconds: -1\n",
         "max_standby_staleness_seconds must be >= 0"),
        ("hosts: {db1: {host: h}}\nmax_standby_staleness_seconds: .inf\n",
         "max_standby_staleness_seconds must be finite"),
        ("hosts: {db1: {host: h}}\nmax_standby_staleness_seconds: true\n",
         "max_standby_staleness_seconds must be a number"),
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
        (ONE, None, "/v1/db1/availability", None, 417, "no heartbeat in public.pgr66_avc yet"),
        (ONE, None, "/v1/nope/availability", None, 417, "invalid"),  # pgroute66: 417, not 404
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


# --------------------------------------------------------------------------- heartbeat and staleness

EPOCH = 1_700_000_000.0  # where the hosts' wall clocks start (each plus its own skew)
NO_TABLE = "table public.pgr66_avc does not exist"


class FakeDatabase:
    """The database side of a Detector on fake time, as PsycopgProber sees it.

    roles: name -> "primary" | "standby" | an Exception (unavailable). Each host's wall clock is
    the FakeClock's time plus its skew. tables: the heartbeat row per host (None: no row yet; a
    host left out has no table). A heartbeat write sets the primary's row to its own clock and is
    streamed to every standby at once, except to those in `stopped` (their WAL receiver died:
    they keep their old row, and their byte lag stays 0).
    """

    def __init__(self, clock: FakeClock, roles: Mapping[str, Any], *,
                 skew: Mapping[str, float] | None = None, table: bool = True) -> None:
        self.clock = clock
        self.roles = dict(roles)
        self.skew = dict(skew or {})
        self.tables: dict[str, float | None] = dict.fromkeys(self.roles) if table else {}
        self.stopped: set[str] = set()
        self.writes: list[tuple[str, float]] = []
        self.fail_writes: Exception | None = None

    def wall(self, name: str) -> float:
        return EPOCH + self.clock.now + self.skew.get(name, 0.0)

    def probe(self, name: str) -> HostState:
        role = self.roles[name]
        if isinstance(role, Exception):
            raise role
        lag = 0 if role == "standby" else None
        if name not in self.tables:
            return HostState(role, lag, self.wall(name), None, NO_TABLE)
        return HostState(role, lag, self.wall(name), self.tables[name])

    def heartbeat(self, name: str) -> None:
        assert self.roles[name] == "primary" and name in self.tables  # the Detector checked
        if self.fail_writes is not None:
            raise self.fail_writes
        value = self.wall(name)
        self.tables[name] = value
        self.writes.append((name, value))
        for other, role in self.roles.items():
            if role == "standby" and other not in self.stopped and other in self.tables:
                self.tables[other] = value


def on_database(roles: Mapping[str, Any], groups: Mapping[str, list[str]] | None = None, *,
                skew: Mapping[str, float] | None = None, table: bool = True, write: bool = True,
                **kwargs: Any) -> tuple[Detector, FakeDatabase, FakeClock]:
    """A Detector on fake time over a FakeDatabase (its heartbeat writer unless write=False)."""
    kwargs.setdefault("cache_ms", 0)
    clock = FakeClock()
    db = FakeDatabase(clock, roles, skew=skew, table=table)
    det = Detector(list(roles), groups or {}, db.probe, heartbeat=db.heartbeat if write else None,
                   clock=clock, executor=clock.executor, **kwargs)
    return det, db, clock


PSS = {"db1": "primary", "db2": "standby", "db3": "standby"}


@pytest.mark.parametrize(
    ("roles", "groups", "path", "query", "written_on"),
    [
        (PSS, None, "/v1/primary", None, ["db1"]),
        (PSS, None, "/v1/primaries", None, ["db1"]),
        (PSS, None, "/v1/standbys", None, ["db1"]),
        (PSS, None, "/v1/primary/db2", None, ["db1"]),  # rw check of another server: the group's scan
        (PSS, None, "/v1/db2/availability", None, ["db1"]),
        (PSS, None, "/v1/standby/db2", None, []),  # no staleness limit: that standby alone is asked
        (PSS, None, "/v1/db1/status", None, []),  # one host, not a group
        ({"db1": "standby", "db2": "standby"}, None, "/v1/primary", None, []),  # no primary
        ({"db1": "primary", "db2": "primary", "db3": "standby"}, None, "/v1/primary", None, []),  # split brain
        ({"db1": Boom("refused"), "db2": "standby"}, None, "/v1/primary", None, []),
        # two clusters: "all" sees two primaries; each group its own
        ({"db1": "primary", "db2": "standby", "db3": "primary", "db4": "standby"}, GROUPS,
         "/v1/primary", None, []),
        ({"db1": "primary", "db2": "standby", "db3": "primary", "db4": "standby"}, GROUPS,
         "/v1/primary", "group=b", ["db3"]),
        ({"db1": "primary", "db2": "standby", "db3": "primary", "db4": "standby"}, GROUPS,
         "/v1/primary", "group=zzz", []),
    ],
)
def test_heartbeat_is_written_only_when_a_group_scan_saw_exactly_one_primary(
        roles: Mapping[str, Any], groups: Mapping[str, list[str]] | None, path: str, query: str | None,
        written_on: list[str]) -> None:
    det, db, _ = on_database(roles, groups)
    try:
        det.route(path, query)
        assert [name for name, _ in db.writes] == written_on
        assert [value for _, value in db.writes] == [EPOCH] * len(written_on)  # the primary's clock
    finally:
        det.close()


def test_no_heartbeat_is_written_to_a_primary_without_the_table() -> None:
    det, db, clock = on_database(PSS, table=False)
    try:
        assert det.route("/v1/primary") == (200, "db1")
        assert db.writes == [] and clock.executor.started["db1:beat"] == 0
    finally:
        det.close()


def test_heartbeat_is_written_at_most_once_per_interval_and_never_waited_for() -> None:
    det, db, clock = on_database(PSS, heartbeat_interval=1.0)
    ex = clock.executor
    try:
        for at in (0.0, 0.5, 0.99, 1.0, 1.7, 2.0):
            clock.advance(at - clock.now)
            det.route("/v1/primary")
        assert [value - EPOCH for _, value in db.writes] == [0.0, 1.0, 2.0]

        ex.durations["db1:beat"] = math.inf  # the next write hangs
        clock.advance(1)
        assert det.route("/v1/primary/db1") == (200, "db1")
        clock.advance(5)
        assert det.route("/v1/primary/db1") == (200, "db1")  # checks go on; no second write
        assert clock.waits == []  # no check waited for the write
        assert ex.started["db1:beat"] == 4
        ex.durations["db1:beat"] = 0
        ex.finish("db1:beat")  # it lands, late
        det.route("/v1/primary")
        assert ex.started["db1:beat"] == 5
        assert [value - EPOCH for _, value in db.writes] == [0.0, 1.0, 2.0, 8.0, 8.0]
    finally:
        det.close()


def test_a_failed_heartbeat_write_warns_and_routes_as_before(caplog: pytest.LogCaptureFixture) -> None:
    det, db, clock = on_database(PSS)
    db.fail_writes = Boom("could not extend file: No space left on device")
    try:
        with caplog.at_level(logging.WARNING, logger="primary_detector"):
            assert det.route("/v1/primary") == (200, "db1")
            clock.advance(1)
            assert det.route("/v1/primary") == (200, "db1")  # unchanged message: not repeated
        assert [r.getMessage() for r in caplog.records] == [
            "host db1: heartbeat not written: Boom: could not extend file: No space left on device"]
        assert clock.executor.started["db1:beat"] == 2
    finally:
        det.close()


def test_a_standby_that_stopped_streaming_is_down_although_its_byte_lag_is_0() -> None:
    det, db, clock = on_database(PSS, max_standby_staleness_seconds=10, max_standby_lag_bytes=0)
    try:
        det.scan()  # the first heartbeat, streamed to both standbys
        db.stopped.add("db3")  # its WAL receiver dies: no more WAL, no lag in bytes
        seen = []
        for _ in range(12):
            clock.advance(1)
            seen.append((clock.now, det.route("/v1/standby/db2")[0], det.route("/v1/standby/db3")[0]))
        assert seen == [(t, 200, 200) for t in range(1, 11)] + [(11, 200, 503), (12, 200, 503)]
        assert det.scan()["db3"].lag_bytes == 0
        assert det.route("/v1/standbys") == (200, ["db2", "db3"])  # pgroute66's list: no limits
        assert det.route("/v1/db3/availability") == (408, "exceeded (exceeded 10 by 12 msec)")
        db.stopped.clear()  # it streams again: the next heartbeat reaches it
        clock.advance(1)
        det.scan()
        assert det.route("/v1/standby/db3") == (200, "db3")
    finally:
        det.close()


def _no_table_anywhere(db: FakeDatabase) -> None:
    db.tables.clear()


def _no_table_on_the_standby(db: FakeDatabase) -> None:
    del db.tables["db2"]


def _no_primary(db: FakeDatabase) -> None:
    db.roles["db1"] = "standby"
    db.tables.update(dict.fromkeys(db.roles, EPOCH))


def _primary_unavailable_from_the_start(db: FakeDatabase) -> None:
    db.roles["db1"] = Boom("refused")
    db.tables.update(dict.fromkeys(db.roles, EPOCH))


@pytest.mark.parametrize(
    ("setup", "write", "why"),
    [
        (_no_table_anywhere, True, NO_TABLE),
        (_no_table_on_the_standby, True, NO_TABLE),
        (None, False, "no heartbeat in public.pgr66_avc yet"),  # the table, but no row
        (_no_primary, True, "no primary seen yet to measure the heartbeat against"),
        (_primary_unavailable_from_the_start, True, "no primary seen yet to measure the heartbeat against"),
    ],
)
@pytest.mark.parametrize(("limit", "status"), [(10, 503), (None, 200)])
def test_an_unknown_staleness_fails_only_when_a_limit_is_set(
        setup: Callable[[FakeDatabase], None] | None, write: bool, why: str,
        limit: float | None, status: int) -> None:
    det, db, clock = on_database(PSS, write=write, max_standby_staleness_seconds=limit)
    if setup is not None:
        setup(db)
    try:
        det.scan()
        clock.advance(1)
        assert det.route("/v1/standby/db2")[0] == status
        assert det.route("/v1/db2/availability") == (417, why)
    finally:
        det.close()


def test_an_unreadable_heartbeat_is_logged_when_a_staleness_limit_is_set(
        caplog: pytest.LogCaptureFixture) -> None:
    for limit in (None, 10):
        det, db, clock = on_database(PSS, max_standby_staleness_seconds=limit)
        del db.tables["db2"]
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="primary_detector"):
                det.route("/v1/standby/db2")
                clock.advance(1)
                det.route("/v1/standby/db2")  # unchanged: not repeated
            want = [] if limit is None else [f"host db2: heartbeat unknown, so its staleness: {NO_TABLE}"]
            assert [r.getMessage() for r in caplog.records] == want
        finally:
            det.close()


def _streaming_for_12_seconds_with_db3_stopped_after_the_first(
        roles: Mapping[str, Any] = PSS, **kwargs: Any) -> tuple[Detector, FakeDatabase, FakeClock]:
    """db3 has the heartbeat written at 0; db1 and db2 the one written at 11; the time is 12."""
    det, db, clock = on_database(roles, {"g": ["db1", "db2"]}, **kwargs)
    det.scan()
    db.stopped.add("db3")
    for _ in range(11):
        clock.advance(1)
        det.scan()
    clock.advance(1)
    return det, db, clock


@pytest.mark.parametrize(
    ("path", "query", "status", "body"),
    [
        ("/v1/db2/availability", None, 200, "ok"),
        ("/v1/db1/availability", None, 200, "ok"),  # the primary's own row, a second old
        ("/v1/db3/availability", None, 408, "exceeded (exceeded 10 by 12 msec)"),  # seconds, not msec
        ("/v1/db3/availability", "limit=12", 200, "ok"),  # exceeded only when older than the limit
        ("/v1/db3/availability", "limit=11", 408, "exceeded (exceeded 11 by 12 msec)"),
        ("/v1/db2/availability", "limit=0", 408, "exceeded (exceeded 0 by 1 msec)"),
        ("/v1/db3/availability", "limit=", 200, "ok"),  # pgroute66's -1: no limit, a known age
        ("/v1/db3/availability", "limit=-1", 200, "ok"),
        ("/v1/db3/availability", "limit=%2B13", 200, "ok"),  # "+13" (a bare + is a space)
        ("/v1/db3/availability", "limit=abc", 417, "invalid limit 'abc': an integer number of seconds"),
        ("/v1/db3/availability", "limit=1.5", 417, "invalid limit '1.5': an integer number of seconds"),
        ("/v1/db2/availability", "group=g", 200, "ok"),
        ("/v1/db3/availability", "group=g", 417, "db3 is not in group 'g'"),
        ("/v1/db2/availability", "group=zzz", 417, "db2 is not in group 'zzz'"),
        ("/v1/db4/availability", None, 417, "unavailable"),
        ("/v1/nope/availability", None, 417, "invalid"),
        ("/v1/nope/availability", "limit=abc", 417, "invalid"),
    ],
)
def test_availability_answers_as_pgroute66(path: str, query: str | None, status: int, body: str) -> None:
    det, _, _ = _streaming_for_12_seconds_with_db3_stopped_after_the_first(
        {**PSS, "db4": Boom("refused")})
    try:
        assert det.route(path, query) == (status, body)
    finally:
        det.close()


@pytest.mark.parametrize(
    "skew",
    [
        {},
        {"db2": -3600.0, "db3": 3600.0},  # standbys' clocks an hour off either way
        {"db3": -30.0},  # the stale one's clock behind: now() - row on it would say -18 s
        {"db1": 86400.0, "db2": 5.0},  # the primary's clock a day ahead of the others'
        {"db1": -7.5},
    ],
)
def test_staleness_does_not_depend_on_the_hosts_clocks(skew: Mapping[str, float]) -> None:
    det, _, _ = _streaming_for_12_seconds_with_db3_stopped_after_the_first(
        skew=skew, max_standby_staleness_seconds=10)
    try:
        states = det.scan()
        assert [det.staleness(n, states, PSS)[0] for n in ("db1", "db2", "db3")] == [1.0, 1.0, 12.0]
        assert det.route("/v1/standby/db2") == (200, "db2")
        assert det.route("/v1/standby/db3") == (503, "")
        assert det.route("/v1/db3/availability") == (408, "exceeded (exceeded 10 by 12 msec)")
    finally:
        det.close()


def test_during_a_failover_standbys_age_on_the_last_primary_and_then_on_the_new_one() -> None:
    # db2's clock is 30 s ahead: the old primary's heartbeats and the new one's differ by that much.
    det, db, clock = on_database(PSS, skew={"db2": 30.0}, max_standby_staleness_seconds=10)
    try:
        for _ in range(3):  # heartbeats at 0, 1 and 2
            det.scan()
            clock.advance(1)
        db.roles["db1"] = ConnectionError("no route to host")  # the primary is gone at 3
        seen = []
        while clock.now <= 13:
            seen.append((clock.now, det.route("/v1/standby/db2")[0], det.route("/v1/standby/db3")[0]))
            clock.advance(1)
        # No primary, so no heartbeat: the standbys stay up until theirs (from 2) is 10 s old.
        assert seen == [(t, 200, 200) for t in range(3, 13)] + [(13, 503, 503)]
        assert db.writes[-1] == ("db1", EPOCH + 2)

        db.roles["db2"] = "primary"  # promoted at 14; db3 follows it
        assert det.route("/v1/standby/db3") == (503, "")  # its row is db1's, measured on db2's clock
        assert db.writes[-1] == ("db2", EPOCH + 30 + 14)
        clock.advance(1)
        assert det.route("/v1/standby/db3") == (200, "db3")  # db2's heartbeat from 14, 1 s old
    finally:
        det.close()


def test_the_staleness_limit_is_inclusive_and_beside_the_lag_limit() -> None:
    det, db, clock = on_database(PSS, max_standby_staleness_seconds=2.5)
    try:
        det.scan()
        db.stopped.add("db3")
        clock.advance(2.5)
        assert det.route("/v1/standby/db3") == (200, "db3")
        clock.advance(0.001)
        assert det.route("/v1/standby/db3") == (503, "")
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


class FakeCursor:
    def __init__(self, row: tuple[Any, ...] | None) -> None:
        self.row = row

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.row


class FakeConnection:
    """Answers each statement with the next of `answers` (a row, or an Exception to raise)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.statements: list[str] = []
        self.closed = False

    def execute(self, sql: str) -> FakeCursor:
        self.statements.append(sql)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return FakeCursor(answer)

    def close(self) -> None:
        self.closed = True


def test_prober_heartbeat_writer_never_waits_for_a_synchronous_standby() -> None:
    prober = PsycopgProber({"db1": {"host": "h", "options": "-c search_path=x"}}, query_timeout=0.5)
    assert "options='-c search_path=x -c statement_timeout=500'" in prober.conninfo("db1")
    assert ("options='-c search_path=x -c statement_timeout=500 -c synchronous_commit=local'"
            in prober.conninfo("db1", writer=True))


@pytest.mark.parametrize(
    ("with_lag", "answers", "state", "statements"),
    [
        (False, [(True, Decimal("1700000000.25"), True), (Decimal("1699999999.5"),)],
         HostState("standby", None, 1700000000.25, 1699999999.5), 2),
        (True, [(True, Decimal(0), Decimal(1700000000), True), (None,)],  # the table, no row
         HostState("standby", 0, 1700000000.0, None), 2),
        (True, [(False, None, Decimal(1700000000), True), (Decimal(1699999999),)],
         HostState("primary", None, 1700000000.0, 1699999999.0), 2),
        # No table, or no privilege: the second statement is not sent (no error in the server's log).
        (False, [(False, Decimal(1700000000), None)],
         HostState("primary", None, 1700000000.0, None, "table public.pgr66_avc does not exist"), 1),
        (False, [(True, Decimal(1700000000), False)],
         HostState("standby", None, 1700000000.0, None, "permission denied for table public.pgr66_avc"), 1),
    ],
)
def test_prober_reads_clock_and_heartbeat(with_lag: bool, answers: list[Any], state: HostState,
                                          statements: int) -> None:
    prober = PsycopgProber({"db1": {"host": "h"}}, with_lag=with_lag, with_heartbeat=True)
    conn = FakeConnection(*answers)
    assert prober._query(conn) == state  # type: ignore[arg-type]
    assert conn.statements[1:] == [pd.HEARTBEAT_READ][:statements - 1]
    assert conn.statements[0].startswith("select pg_is_in_recovery(), ")
    assert conn.statements[0].endswith(
        "extract(epoch from clock_timestamp()), has_table_privilege(to_regclass('public.pgr66_avc'), 'select')")


def test_prober_heartbeat_read_error_is_the_hosts_heartbeat_error() -> None:
    import psycopg

    prober = PsycopgProber({"db1": {"host": "h"}}, with_heartbeat=True)
    conn = FakeConnection((True, Decimal(1700000000), True),
                          psycopg.errors.UndefinedTable('relation "public.pgr66_avc"\n does not exist'))
    assert prober._query(conn) == HostState(  # type: ignore[arg-type]
        "standby", None, 1700000000.0, None, 'relation "public.pgr66_avc" does not exist')


def test_prober_without_heartbeat_asks_only_for_the_role() -> None:
    prober = PsycopgProber({"db1": {"host": "h"}})
    conn = FakeConnection((False,))
    assert prober._query(conn) == P  # type: ignore[arg-type]
    assert conn.statements == ["select pg_is_in_recovery()"]


def test_prober_heartbeat_writes_on_its_own_connection_and_drops_it_on_error() -> None:
    prober = PsycopgProber({"db1": {"host": "h"}}, with_heartbeat=True)
    writer = FakeConnection(None, Boom("cannot execute UPDATE in a read-only transaction"))
    prober._writers["db1"] = writer  # type: ignore[assignment]
    prober.heartbeat("db1")
    assert writer.statements == [pd.HEARTBEAT_WRITE]
    assert "clock_timestamp() at time zone 'UTC'" in pd.HEARTBEAT_WRITE
    with pytest.raises(Boom):
        prober.heartbeat("db1")
    assert writer.closed and "db1" not in prober._writers and prober._conns == {}


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
        ("/v1/db2/availability?limit=5", 417, "no heartbeat in public.pgr66_avc yet"),
        ("/v1/db9/availability", 417, "invalid"),
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
