"""tasks/adapters/routing/primary_detector.py: config, routes, parallel scan, cache, HTTP server.

No PostgreSQL: the Detector gets a fake probe; the psycopg prober is only pointed at a closed port.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tasks.adapters.routing import primary_detector as pd
from tasks.adapters.routing.primary_detector import (
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


def S_lag(lag: int | None) -> HostState:
    return HostState("standby", lag)


class Boom(Exception):
    pass


class FakeProbe:
    """states: name -> HostState, or an Exception to raise; delays: name -> seconds to sleep."""

    def __init__(self, states: Mapping[str, Any], delays: Mapping[str, float] | None = None,
                 release: threading.Event | None = None) -> None:
        self.states = dict(states)
        self.delays = dict(delays or {})
        self.release = release
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> HostState:
        with self._lock:
            self.calls[name] += 1
        delay = self.delays.get(name, 0.0)
        if delay:
            if self.release is not None:
                self.release.wait(delay)
            else:
                time.sleep(delay)
        result = self.states[name]
        if isinstance(result, Exception):
            raise result
        return result


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
        (TWO_CLUSTERS, GROUPS, "/v1/primary", {"group": ""}, 409, ""),
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
    names = ["db1", "db2", "db3", "db4"]
    probe = FakeProbe({n: S for n in names}, delays={n: 0.2 for n in names})
    det = Detector(names, {}, probe, query_timeout=1.0, cache_ms=0)
    try:
        started = time.monotonic()
        states = det.scan()
        elapsed = time.monotonic() - started
        assert states == {n: S for n in names}
        assert elapsed < 0.6  # in sequence it would take 0.8 s
    finally:
        det.close()


def test_slow_host_is_unavailable_and_deadline_holds() -> None:
    release = threading.Event()
    probe = FakeProbe({"db1": P, "db2": S, "db3": P}, delays={"db3": 10.0}, release=release)
    det = Detector(["db1", "db2", "db3"], {}, probe, query_timeout=0.3, cache_ms=0)
    try:
        started = time.monotonic()
        states = det.scan()
        elapsed = time.monotonic() - started
        assert elapsed < 2 * 0.3
        assert states == {"db1": P, "db2": S, "db3": HostState(None)}
        # The hung host cannot cause split brain: db3 counts as neither.
        assert det.route("/v1/primary") == (200, "db1")
        assert det.route("/v1/db3/status") == (422, "unavailable")

        # While it still hangs it is not probed again (no thread pile-up) and costs no wait.
        started = time.monotonic()
        assert det.scan()["db3"] == HostState(None)
        assert time.monotonic() - started < 0.3
        assert probe.calls["db3"] == 1
        assert probe.calls["db1"] >= 3

        release.set()  # the hung probe finishes, far too late to count
        deadline = time.monotonic() + 2
        while probe.calls["db3"] == 1 and time.monotonic() < deadline:
            det.scan()
            time.sleep(0.01)
        assert probe.calls["db3"] == 2  # a fresh probe once the hung one returned
    finally:
        release.set()
        det.close()


def test_a_host_unavailable_at_its_last_probe_is_not_waited_for() -> None:
    # After a failover the old primary's host is dead: each new connect attempt hangs. Checks for
    # the new primary must not wait for it every time, and the host counts again once it answers.
    # The deadline is 30 s, so a scan that waited could not come back within a few seconds.
    release = threading.Event()
    probe = FakeProbe({"db1": ConnectionError("no route to host"), "db2": P}, release=release)
    det = Detector(["db1", "db2"], {}, probe, query_timeout=30, cache_ms=0)
    try:
        assert det.scan()["db1"] == HostState(None)  # refused at once: now known unavailable
        probe.delays["db1"] = 60  # its next connect attempt hangs until released
        started = time.monotonic()
        assert det.route("/v1/primary/db2") == (200, "db2")
        assert time.monotonic() - started < 10
        assert probe.calls["db1"] == 2  # the hanging probe was started, just not waited for

        probe.states["db1"] = P  # it comes back, still claiming primary
        release.set()
        deadline = time.monotonic() + 5
        while det.route("/v1/primary")[0] != 409 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert det.route("/v1/primary") == (409, "")  # split brain is seen again
        assert det.route("/v1/primary/db2") == (503, "")
    finally:
        release.set()
        det.close()


def test_late_answer_is_not_used() -> None:
    probe = FakeProbe({"db1": P}, delays={"db1": 0.3})
    det = Detector(["db1"], {}, probe, query_timeout=0.1, cache_ms=60_000)
    try:
        assert det.scan() == {"db1": HostState(None)}
        time.sleep(0.4)  # the probe has now returned "primary", but after its deadline
        assert det.scan() == {"db1": HostState(None)}
        assert probe.calls["db1"] == 1
    finally:
        det.close()


# --------------------------------------------------------------------------- cache


@pytest.mark.parametrize(
    ("cache_ms", "pause", "calls"),
    [
        (10_000, 0.0, 1),  # within the window: one probe per host
        (0, 0.0, 2),  # caching off
        (50, 0.15, 2),  # window expired
    ],
)
def test_cache_window(cache_ms: int, pause: float, calls: int) -> None:
    probe = FakeProbe({"db1": P, "db2": S})
    det = Detector(["db1", "db2"], {"g": ["db1", "db2"]}, probe, cache_ms=cache_ms)
    try:
        det.route("/v1/primary")
        time.sleep(pause)
        det.route("/v1/standbys", {"group": "g"})  # another route and group share the cache
        assert probe.calls == {"db1": calls, "db2": calls}
    finally:
        det.close()


def test_concurrent_requests_share_one_scan() -> None:
    probe = FakeProbe({"db1": P, "db2": S}, delays={"db1": 0.2, "db2": 0.2})
    det = Detector(["db1", "db2"], {}, probe, cache_ms=0)
    barrier = threading.Barrier(10)
    results: list[tuple[int, Any]] = []

    def check() -> None:
        barrier.wait()
        results.append(det.route("/v1/primary/db1"))

    threads = [threading.Thread(target=check) for _ in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert results == [(200, "db1")] * 10
        assert probe.calls == {"db1": 1, "db2": 1}  # even with caching off: single flight
    finally:
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
        deadline = time.monotonic() + 10
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
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "unknown config key 'fancy' ignored" in err
        assert "host db1: unavailable" in err
        assert "received SIGTERM" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
