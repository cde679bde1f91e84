"""Pydantic models of a PgQuartz job file, key for key as PgQuartz (Go, yaml.v2) reads it.

Attribute names are snake_case; the YAML keys are the aliases and the *only* names accepted, so a
job file is read with exactly PgQuartz's spelling (`conn_params`, `etcdConfig`, `lockKey`, ...).
Scalars arrive as the raw YAML text (see loader), so the small `Yaml*` types below re-create
yaml.v2's conversions: a matrix value `010` stays the string "010" as in Go, not the int 8.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

__all__ = [
    "parse_go_duration", "Command", "Check", "Step", "Connection", "EtcdConfig", "GitConfig", "Job",
    "ALL_KEYS", "SHELL", "Role", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_ETCD_ENDPOINTS",
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


class EtcdConfig(_Model):
    endpoints: list[str] = Field(default_factory=lambda: list(DEFAULT_ETCD_ENDPOINTS))
    # None until the loader fills in the job name (pgquartz's default).
    lock_key: Annotated[str | None, AfterValidator(_lock_key)] = Field(None, alias="lockKey")
    lock_timeout: GoDuration = Field(DEFAULT_LOCK_TIMEOUT, alias="lockTimeout")

    @model_validator(mode="after")
    def _default_endpoints(self) -> "EtcdConfig":
        if not self.endpoints:
            self.endpoints = list(DEFAULT_ETCD_ENDPOINTS)  # pgquartz: empty list -> default
        return self


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
