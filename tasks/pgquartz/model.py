"""Pydantic models of a PgQuartz job file, key for key as PgQuartz (Go, yaml.v2) reads it.

Attribute names are snake_case; the YAML keys are the aliases and the *only* names accepted, so a
job file is read with exactly PgQuartz's spelling (`conn_params`, `etcdConfig`, `lockKey`, ...).
Scalars arrive as the raw YAML text (see loader), so the small `Yaml*` types below re-create
yaml.v2's conversions: a matrix value `010` stays the string "010" as in Go, not the int 8.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    model_validator,
)

__all__ = [
    "parse_go_duration", "Command", "Check", "Step", "Connection", "EtcdConfig", "GitConfig", "Job",
    "ALL_KEYS", "SHELL", "Role", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_ETCD_ENDPOINTS",
    "etcd_endpoint_address", "is_loopback_endpoint",
]

SHELL = "shell"
DEFAULT_LOCK_TIMEOUT = 100 * 3600.0  # pgquartz: lockTimeout "100h"
DEFAULT_ETCD_ENDPOINTS = ("localhost:2379",)
Role = Literal["primary", "standby", "all"]
_ROLES = ("primary", "standby", "all")

# --------------------------------------------------------------------------- Go durations

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go `time.ParseDuration` string: "30m", "1h30m", "1.5h", "300ms", "-2s", "0".

    Mirrors Go's grammar exactly (units ns/us/µs/ms/s/m/h, every number needs a unit except a bare
    "0") so that a duration we accept is one PgQuartz accepts, and vice versa.
    """
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like '30m', got {text!r}")
    rest = text
    sign = 1.0
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    while rest:
        m = _DURATION_PART.match(rest)
        assert m is not None  # the pattern can match the empty string
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r} (use ns, us, ms, s, m or h)")
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r} (use ns, us, ms, s, m or h)")
        total += float(f"{whole or 0}.{frac or 0}") * _DURATION_UNITS[unit]
        rest = rest[m.end():]
    return sign * total


# --------------------------------------------------------------------------- yaml.v2 scalar rules

_GO_TRUE = {"y", "Y", "yes", "Yes", "YES", "on", "On", "ON", "true", "True", "TRUE"}
_GO_FALSE = {"n", "N", "no", "No", "NO", "off", "Off", "OFF", "false", "False", "FALSE"}


def _yaml_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in _GO_TRUE:
            return True
        if value in _GO_FALSE:
            return False
    raise ValueError(f"must be true or false, got {value!r}")


def _yaml_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        # yaml.v2: strip `_`, then strconv base 0 (0x.., 0o.., 0b.., legacy 0NNN octal).
        m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]+|0|[1-9][0-9]*)",
                         value.replace("_", ""))
        if m:
            sign = -1 if m.group(1) == "-" else 1
            body = m.group(2)
            return sign * (int(body, 8) if re.fullmatch(r"0[0-7]+", body) else int(body, 0))
    raise ValueError(f"must be an integer, got {value!r}")


def _positive_duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = parse_go_duration(value)
    if seconds <= 0:
        # Go would accept "0s" and then time out immediately; that is never what a job means.
        raise ValueError(f"duration must be positive, got {value!r}")
    return seconds


def _role(value: Any) -> Any:
    if value not in _ROLES:
        raise ValueError(f"role must be primary, standby or all, got {value!r}")
    return value


def _command_role(value: Any) -> Any:
    return value if value == "" else _role(value)


_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _matrix(value: dict[str, list[str]]) -> dict[str, list[str]]:
    for arg, values in value.items():
        # pgquartz does not check this, but the name must work both as PGQ_INSTANCE_<ARG> in a
        # shell and as `:arg` in SQL; `my-arg` would silently work in neither.
        if not _ARG_NAME.match(arg):
            raise ValueError(f"matrix argument {arg!r} must be a name like my_arg (letters, digits, _)")
        if not values:
            # pgquartz's explode then yields odd results (the argument silently disappears).
            raise ValueError(f"matrix argument {arg!r} has no values")
    return value


YamlBool = Annotated[bool, BeforeValidator(_yaml_bool)]
YamlInt = Annotated[int, BeforeValidator(_yaml_int)]
GoDuration = Annotated[float, BeforeValidator(_positive_duration)]
Matrix = Annotated[dict[str, list[str]], AfterValidator(_matrix)]


class _Model(BaseModel):
    # extra="forbid": pgquartz (yaml.v2 Unmarshal) silently ignores unknown keys, so a typo such as
    # `etcd_config:` (the PgVillage docs' spelling) drops the whole lock configuration without a
    # word. That exact bug is in the wild; we refuse unknown keys instead.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # yaml.v2 leaves a field at its zero value for `key:` / `key: null`; treat it as absent
        # so the default applies instead of a type error.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Command(_Model):
    """One shell script or SQL text; `type` is `shell` (or empty) or the name of a connection."""

    name: str = ""
    type: str = ""
    inline: str = ""
    file: str = ""
    # Overrides the connection's role for this SQL command (pgquartz ignores it for shell).
    role: Annotated[str, AfterValidator(_command_role)] = ""
    batch_mode: YamlBool = Field(False, alias="batchMode")

    @model_validator(mode="after")
    def _one_body(self) -> "Command":
        has_inline, has_file = bool(self.inline.strip()), bool(self.file.strip())
        if has_inline and has_file:
            # pgquartz silently prefers inline and never reads the file.
            raise ValueError("set exactly one of inline or file, not both (pgquartz would ignore file)")
        if not has_inline and not has_file:
            raise ValueError("set exactly one of inline or file (this command has no body)")
        return self

    @property
    def is_shell(self) -> bool:
        return self.type in ("", SHELL)

    @property
    def connection(self) -> str | None:
        """The connection this command runs on, None for shell."""
        return None if self.is_shell else self.type

    @property
    def label(self) -> str:
        return self.name or (self.file if self.file else self.inline.strip().splitlines()[0][:60])


def _single_line(value: str) -> str:
    if "\n" in value:
        raise ValueError("must be a single line: pgquartz matches it against one output line at a time")
    return value


class Check(Command):
    """A command run after the steps; fails the job unless rc and output are as expected."""

    # Shell: the exit code to expect. SQL: 0 = must succeed, anything else = must fail.
    rc: YamlInt = 0
    expected: Annotated[str, AfterValidator(_single_line)] = ""
    unexpected: Annotated[str, AfterValidator(_single_line)] = ""
    matrix: Matrix = Field(default_factory=dict)


class Step(_Model):
    commands: list[Command] = Field(min_length=1)
    depends: list[str] = Field(default_factory=list)
    when: list[str] = Field(default_factory=list)
    matrix: Matrix = Field(default_factory=dict)


class Connection(_Model):
    type: str = ""  # informational only in pgquartz
    conn_params: dict[str, str] = Field(default_factory=dict)
    # Required: pgquartz's role check fails on an empty role (panic, or every SQL command fails).
    role: Annotated[str, AfterValidator(_role)]

    def __repr_args__(self) -> Any:
        # Jobs end up in flow logs; libpq's password must not.
        for key, value in super().__repr_args__():
            if key == "conn_params" and isinstance(value, dict) and "password" in value:
                value = {**value, "password": "***"}
            yield key, value


def _lock_key(value: str | None) -> str | None:
    if value is not None and "/" in value:
        # The etcd mutex works on the prefix /pgquartz/<lockKey>/, so key "a" would also count
        # the waiters of key "a/b" as lock holders.
        raise ValueError(f"lockKey must not contain '/', got {value!r}")
    return value or None  # "" means "default" in pgquartz


# --------------------------------------------------------------------------- etcd endpoints


def etcd_endpoint_address(endpoint: str) -> str:
    """`host:port` of a pgquartz etcd endpoint, read the way etcd's Go client (v3.5) reads it.

    The client takes a plain `host:port` as is and, for `http://host:port[/path]`, only the
    URL's host part; both mean plain HTTP/gRPC because pgquartz configures no TLS. Refused here,
    since the runner's etcd client speaks plain HTTP to a host and port only: `https://` (the Go
    client would use TLS), `unix:`/`unixs:` sockets and other schemes, and a missing port.
    """
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"an etcd endpoint is host:port or http://host:port, got {endpoint!r}")
    if endpoint.startswith(("unix:", "unixs:")):
        raise ValueError(f"etcd endpoint {endpoint!r} is a unix socket; the runner reaches etcd over "
                         "the network only: use host:port")
    hostport = endpoint
    if "://" in endpoint:
        scheme = endpoint.partition("://")[0].lower()  # Go's url.Parse lower-cases it too
        if scheme == "https":
            raise ValueError(f"etcd endpoint {endpoint!r} asks for TLS, which the runner's etcd client "
                             "does not speak; use host:port or http://host:port")
        if scheme != "http":
            raise ValueError(f"etcd endpoint {endpoint!r}: unsupported scheme {scheme!r} "
                             "(use host:port or http://host:port)")
        hostport = urlsplit(endpoint).netloc
        if "@" in hostport:
            raise ValueError(f"etcd endpoint {endpoint!r}: credentials in the URL are not supported")
    try:
        parts = urlsplit(f"//{hostport}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port ({exc})") from None
    if not host or port is None or parts.path or parts.query or parts.fragment:
        raise ValueError(f"etcd endpoint {endpoint!r} needs a host and a port, like etcd1:2379")
    if port == 0:
        raise ValueError(f"etcd endpoint {endpoint!r}: port 0 is not a port")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_endpoint(address: str) -> bool:
    """Whether a `host:port` (from etcd_endpoint_address) is on the loopback interface."""
    host = address.rpartition(":")[0].strip("[]").lower()
    if host in ("localhost", "localhost.") or host.endswith((".localhost", ".localhost.")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _etcd_endpoint(value: str) -> str:
    etcd_endpoint_address(value)  # refuse what the runner cannot reach; keep the text as written
    return value


EtcdEndpoint = Annotated[str, AfterValidator(_etcd_endpoint)]


class EtcdConfig(_Model):
    # None = not given (pgquartz then uses DEFAULT_ETCD_ENDPOINTS); kept apart from an explicit
    # `[localhost:2379]` so the runner can tell "use the cluster's etcd" from "use this one".
    endpoints: list[EtcdEndpoint] | None = None
    # None until the loader fills in the job name (pgquartz's default).
    lock_key: Annotated[str | None, AfterValidator(_lock_key)] = Field(None, alias="lockKey")
    lock_timeout: GoDuration = Field(DEFAULT_LOCK_TIMEOUT, alias="lockTimeout")

    @model_validator(mode="after")
    def _empty_endpoints_are_not_given(self) -> "EtcdConfig":
        if not self.endpoints:
            self.endpoints = None  # pgquartz: an empty list means the default, as an absent one does
        return self

    @property
    def endpoints_given(self) -> bool:
        return self.endpoints is not None

    @property
    def effective_endpoints(self) -> list[str]:
        """The endpoints pgquartz itself would use (its default when the job sets none)."""
        return list(self.endpoints if self.endpoints is not None else DEFAULT_ETCD_ENDPOINTS)

    def lock_endpoints(self, cluster_endpoints: Sequence[str]) -> list[str]:
        """The `host:port` list a runner that is not on the node takes the lock through.

        Not given: the cluster's etcd (`cluster_endpoints`, "host:port"). Given: each endpoint,
        normalised like etcd's client does; a loopback one (localhost, 127.0.0.0/8, ::1) names
        the etcd member on the node pgquartz runs on, which the runner reaches as each of the
        cluster's members at that endpoint's port.
        """
        if self.endpoints is None:
            return list(cluster_endpoints)
        out: list[str] = []
        for endpoint in self.endpoints:
            address = etcd_endpoint_address(endpoint)
            if is_loopback_endpoint(address):
                port = address.rpartition(":")[2]
                out += [f"{member.rpartition(':')[0]}:{port}" for member in cluster_endpoints]
            else:
                out.append(address)
        return list(dict.fromkeys(out))


class GitConfig(_Model):
    """pgquartz's self-update from git; parsed so such files load, not acted upon."""

    dir: str = ""
    url: str = ""
    remote: str = "origin"
    revision: str = "main"
    rsa_path: str = Field("~/.ssh/id_rsa", alias="rsaPath")
    http_user: str = Field("", alias="httpUser")
    http_password: str = Field("", alias="httpPassword", repr=False)
    disable: YamlBool = False


def _parallel(value: int) -> int:
    if value == 0:
        raise ValueError("parallel: 0 runs nothing in pgquartz; set parallel ≥ 1")
    if value < 0:
        raise ValueError(f"parallel must be ≥ 1, got {value}")
    return value


def _steps(value: dict[str, Step]) -> dict[str, Step]:
    if not value:
        raise ValueError("at least one step is required (pgquartz refuses a job without steps)")
    if "" in value:
        raise ValueError("a step needs a non-empty name")
    return value


class Job(_Model):
    steps: Annotated[dict[str, Step], AfterValidator(_steps)]
    checks: list[Check] = Field(default_factory=list)
    connections: dict[str, Connection] = Field(default_factory=dict)
    # Required although pgquartz defaults it: its default 0 starts no runners at all.
    parallel: Annotated[YamlInt, AfterValidator(_parallel)]
    timeout: GoDuration | None = None  # seconds; None = no job timeout
    workdir: str = ""
    log_file: str = Field("", alias="logFile")
    debug: YamlBool = False
    run_on_role_error: YamlBool = Field(False, alias="runOnRoleError")
    etcd_config: EtcdConfig = Field(default_factory=lambda: EtcdConfig.model_validate({}), alias="etcdConfig")
    git: GitConfig = Field(default_factory=lambda: GitConfig.model_validate({}))
    # pgquartz parses these but never uses them; accepted (and ignored) so files load unchanged.
    target: Any = None
    alerts: Any = None
    log: Any = None

    _name: str = PrivateAttr("")
    _source: Path | None = PrivateAttr(None)

    @property
    def name(self) -> str:
        """Job name = job file name without extension (set by the loader)."""
        return self._name

    @property
    def source(self) -> Path | None:
        """The job file (symlinks resolved, as pgquartz does), None if not loaded from a file."""
        return self._source

    @property
    def workdir_path(self) -> Path:
        """Directory `file:` paths are relative to: `workdir`, else the job file's directory.

        A relative `workdir` is taken relative to the job file (pgquartz would use its own cwd,
        which under systemd is `/`).
        """
        base = self._source.parent if self._source is not None else Path.cwd()
        return base / self.workdir if self.workdir else base

    @property
    def log_file_path(self) -> Path | None:
        """`logFile` as a path, None when unset; a relative one is taken relative to the job file,
        as `workdir` is (pgquartz would use its own cwd)."""
        if not self.log_file:
            return None
        base = self._source.parent if self._source is not None else Path.cwd()
        return base / self.log_file

    @property
    def lock_key(self) -> str:
        return self.etcd_config.lock_key or self._name

    @property
    def lock_prefix(self) -> str:
        """The etcd key prefix pgquartz's mutex uses: `/pgquartz/<lockKey>/`."""
        if not self.lock_key:
            raise ValueError("job has no lockKey and no name")
        return f"/pgquartz/{self.lock_key}/"

    def bind_source(self, source: Path, name: str) -> None:
        """Record where the job came from and apply the name-based defaults (loader use)."""
        self._source = source
        self._name = name
        if not self.etcd_config.lock_key:
            self.etcd_config.lock_key = name


def _aliases(model: type[BaseModel]) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


# Every key a job file may contain anywhere; used to suggest the right spelling of a typo.
ALL_KEYS: frozenset[str] = frozenset().union(
    *(_aliases(m) for m in (Command, Check, Step, Connection, EtcdConfig, GitConfig, Job)))
