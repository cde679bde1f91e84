"""The cluster inventory: which hosts, which roles, which versions, where things listen.

Pure pydantic, no Prefect: the same model validates a YAML file, a Prefect block and a flow
parameter. Every validation error names the file, the field and what is wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.errors import BouwsteenError

# Every pattern is a full match (pydantic's Rust regex: `$` is the end of the text, never before a
# trailing newline). No pattern admits whitespace or control characters unless it says so.
HOSTNAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
CLUSTER_NAME = r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$"
# A login name on the hosts (useradd's NAME_REGEX, without the trailing '$').
UNIX_USER = r"^[a-z_][a-z0-9_-]{0,31}$"
# An absolute path of safe characters; `.`/`..` components are refused by _no_dot_components.
SAFE_ABSOLUTE_PATH = r"^(/[A-Za-z0-9_.+@-]+)+$"
# A GUC name: `name` or, for an extension's placeholder, `extension.name`.
GUC_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"
# A value for postgresql.conf / Patroni / stolon: printable, no newline or other control character.
GUC_VALUE = r"^[^\x00-\x1f\x7f]{0,1024}$"
# A DNS name: labels of HOSTNAME, dot-separated.
DNS_NAME = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
S3_REGION = r"^[a-z0-9][a-z0-9_-]{0,62}$"
S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
STORE_PREFIX = r"^/?[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*/?$"
# A data directory: like SAFE_ABSOLUTE_PATH, plus single inner spaces (Patroni's YAML and
# pgBackRest's pg1-path hold them; the stolon driver refuses them for its unit files).
DATA_DIRECTORY = r"^(/[A-Za-z0-9_.+@-]+( [A-Za-z0-9_.+@-]+)*)+$"

# Folders a data directory (or the object store's data_path) must never be: wiping or chowning
# one breaks the host. Paths below the pseudo/system trees are refused as well.
SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/lib", "/usr/local",
    "/usr/sbin", "/usr/share", "/var", "/var/lib", "/var/lib/postgresql", "/var/log", "/var/tmp",
})
SYSTEM_TREES = ("/bin/", "/boot/", "/dev/", "/etc/", "/lib/", "/lib32/", "/lib64/", "/proc/", "/run/", "/sbin/",
                "/sys/", "/usr/bin/", "/usr/lib/", "/usr/sbin/")


def _no_dot_components(path: str) -> str:
    if any(part in (".", "..") for part in path.split("/")):
        raise ValueError("a '.' or '..' component is not allowed; give the path itself")
    return path


def _not_a_system_folder(path: str) -> str:
    if path in SYSTEM_FOLDERS or path.startswith(SYSTEM_TREES):
        raise ValueError(f"{path} is a system folder (or inside one); give a folder of its own, e.g. /srv/<name>")
    return path


SafePath = Annotated[str, Field(pattern=SAFE_ABSOLUTE_PATH, max_length=4096), AfterValidator(_no_dot_components)]
DataPath = Annotated[SafePath, AfterValidator(_not_a_system_folder)]
DataDirectory = Annotated[
    str, Field(pattern=DATA_DIRECTORY, max_length=4096),
    AfterValidator(_no_dot_components), AfterValidator(_not_a_system_folder),
]
GucName = Annotated[str, Field(pattern=GUC_NAME)]
GucValue = Annotated[str, Field(pattern=GUC_VALUE)]


class Role(str, Enum):
    db = "db"
    etcd = "etcd"
    backup = "backup"
    router = "router"
    restore = "restore"


class HaManager(str, Enum):
    patroni = "patroni"
    stolon = "stolon"


class BackupTool(str, Enum):
    pgbackrest = "pgbackrest"
    walg = "walg"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostSpec(Strict):
    name: Annotated[str, Field(pattern=HOSTNAME, description="short host name, as HAProxy/pgroute66 know it")]
    address: ipaddress.IPv4Address
    roles: list[Role] = Field(default_factory=list)
    ssh_user: str | None = Field(default=None, pattern=UNIX_USER)
    ssh_port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, roles: list[Role]) -> list[Role]:
        if len(set(roles)) != len(roles):
            raise ValueError("a role is listed twice")
        return roles

    def has(self, role: Role) -> bool:
        return role in self.roles


class PostgresSpec(Strict):
    version: int = Field(default=15, ge=12, le=18)
    port: int = Field(default=5432, ge=1, le=65535)
    data_directory: DataDirectory | None = None
    parameters: dict[GucName, GucValue] = Field(default_factory=dict)
    synchronous_replication: bool = False
    application_database: str = Field(default="app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    @property
    def data_dir(self) -> str:
        return self.data_directory or f"/var/lib/postgresql/{self.version}/main"

    @property
    def bin_dir(self) -> str:
        return f"/usr/lib/postgresql/{self.version}/bin"

    @property
    def package(self) -> str:
        return f"postgresql-{self.version}"


class EtcdSpec(Strict):
    client_port: int = Field(default=2379, ge=1, le=65535)
    peer_port: int = Field(default=2380, ge=1, le=65535)
    # Everything this project and its HA manager keep in etcd lives under this prefix.
    prefix: str = Field(default="/bouwsteen", pattern=r"^(/[a-z0-9_-]+)+$")


class StolonSpec(Strict):
    """Production HA manager settings; `cluster_spec` is stolon's cluster spec (checked by the driver)."""

    store_prefix: str = Field(default="stolon/cluster", pattern=STORE_PREFIX, max_length=255)
    proxy_port: int = Field(default=25432, ge=1, le=65535)
    cluster_spec: dict[str, Any] = Field(default_factory=dict)


class TlsSpec(Strict):
    """PostgreSQL over TLS only, with certificates from the cluster's CA (block
    `bouwsteen-certificate-authority`, named after the cluster); see `tasks/adapters/pki.py`."""

    enabled: bool = False
    lifetime_days: int = Field(default=365, ge=7, le=825)
    # A certificate is replaced this long before it expires (every run after that installs the next).
    renew_within_days: int = Field(default=30, ge=1, le=365)
    # check_hosts fails when a certificate in use has fewer days left than this.
    alarm_within_days: int = Field(default=21, ge=1, le=365)
    # Bump to replace every key and certificate at once (a forced rotation).
    generation: int = Field(default=0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _windows(self) -> "TlsSpec":
        if self.renew_within_days >= self.lifetime_days:
            raise ValueError(f"renew_within_days ({self.renew_within_days}) must be less than lifetime_days "
                             f"({self.lifetime_days})")
        if self.alarm_within_days > self.renew_within_days:
            raise ValueError(f"alarm_within_days ({self.alarm_within_days}) must not exceed renew_within_days "
                             f"({self.renew_within_days}): the alarm would ring before renewal is due")
        return self


class PatroniSpec(Strict):
    rest_port: int = Field(default=8008, ge=1, le=65535)
    # HAProxy on every database host leads this port to the primary (stolon-proxy's contract).
    proxy_port: int = Field(default=25432, ge=1, le=65535)
    # Patroni refuses ttl < 20; loop_wait + 2 * retry_timeout must stay <= ttl.
    ttl: int = Field(default=20, ge=20, le=300)
    loop_wait: int = Field(default=2, ge=1, le=60)
    retry_timeout: int = Field(default=5, ge=3, le=120)
    maximum_lag_on_failover: int = Field(default=1048576, ge=0)

    @model_validator(mode="after")
    def _timing(self) -> "PatroniSpec":
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"loop_wait ({self.loop_wait}) + 2 * retry_timeout ({self.retry_timeout}) must not exceed ttl ({self.ttl})"
            )
        return self


class ObjectStoreSpec(Strict):
    host: str = Field(pattern=HOSTNAME, description="the backup server (role backup)")
    endpoint: str = Field(pattern=rf"^https://{DNS_NAME}(:[0-9]{{1,5}})?/?$", max_length=253 + 16,
                          description="S3 endpoint, TLS only")
    bucket: str = Field(pattern=S3_BUCKET, description="S3 bucket naming rules")
    region: str = Field(default="us-east-1", pattern=S3_REGION)
    data_path: DataPath = Field(default="/srv/s3", description="the site's file-level backup picks this up")
    server: Literal["minio", "rclone"] = Field(
        default="minio", description="MinIO in production; rclone serve s3 where MinIO cannot be installed (the lab)"
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_port(cls, endpoint: str) -> str:
        rest = endpoint.split("://", 1)[1].rstrip("/")
        if ":" in rest and not 1 <= int(rest.split(":", 1)[1]) <= 65535:
            raise ValueError(f"port {rest.split(':', 1)[1]} is out of range 1-65535")
        return endpoint

    @field_validator("bucket")
    @classmethod
    def _s3_bucket_rules(cls, bucket: str) -> str:
        if ".." in bucket or ".-" in bucket or "-." in bucket:
            raise ValueError("two periods, or a period next to a hyphen, are not allowed in an S3 bucket name")
        if all(part.isdigit() for part in bucket.split(".")) and bucket.count(".") == 3:
            raise ValueError("an S3 bucket name must not look like an IP address")
        if bucket.startswith(("xn--", "sthree-")) or bucket.endswith(("-s3alias", "--ol-s3")):
            raise ValueError("S3 reserves this prefix or suffix (xn--, sthree-, -s3alias, --ol-s3)")
        return bucket

    @property
    def endpoint_host(self) -> str:
        return self.endpoint.split("://", 1)[1].split(":", 1)[0].rstrip("/")

    @property
    def endpoint_port(self) -> int:
        rest = self.endpoint.split("://", 1)[1].rstrip("/")
        return int(rest.split(":", 1)[1]) if ":" in rest else 443


class Pgroute66Spec(Strict):
    """An existing pgroute66 (PgVillage's package) on every router, asked the way its own HAProxy
    check scripts ask it: an `external-check` per server that reads `/v1/primary` or `/v1/standbys`."""

    url: str = Field(
        default="http://127.0.0.1:8080",
        pattern=r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$",
        description="where pgroute66 serves on each router: its `bind` and `port` (8080, or 8443 with its TLS)",
    )
    group: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,63}$",
        description="the `groups:` entry of pgroute66's config to ask; unset: no ?group=, i.e. every host in its "
                    "`hosts:` (pgroute66's 'all'). pgroute66 reads `groups:`; a `host_groups:` section is ignored",
    )
    server_key: Literal["name", "address"] = Field(
        default="name",
        description="what pgroute66's `hosts:` are keyed by: the inventory host name (= HAProxy server name) or "
                    "the host's address (older PgVillage configs)",
    )
    ca_file: SafePath | None = Field(
        default=None,
        description="CA bundle on the routers to verify an https url (pgroute66's ssl.b64cert)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "Pgroute66Spec":
        if self.port > 65535:
            raise ValueError(f"url: port {self.port} is out of range")
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file: only with an https:// url")
        return self

    @property
    def port(self) -> int:
        rest = self.url.split("://", 1)[1]
        tail = rest.rsplit("]", 1)[-1]
        if ":" in tail:
            return int(tail.rsplit(":", 1)[1])
        return 443 if self.url.startswith("https://") else 80


class RoutingSpec(Strict):
    vip: ipaddress.IPv4Address
    rw_port: int = Field(default=5432, ge=1, le=65535)
    ro_port: int = Field(default=5433, ge=1, le=65535)
    stats_port: int = Field(default=8404, ge=1, le=65535)
    detector_port: int = Field(default=8080, ge=1, le=65535)
    virtual_router_id: int | None = Field(default=None, ge=1, le=255)
    preempt: bool = False
    interface: str = Field(default="eth0", pattern=r"^[a-zA-Z0-9_.:-]{1,15}$", description="routers' VIP interface")

    @field_validator("interface")
    @classmethod
    def _interface_name(cls, interface: str) -> str:
        if interface in (".", ".."):
            raise ValueError("'.' and '..' are not interface names")
        return interface
    detector: Literal["bouwsteen", "pgroute66"] = Field(
        default="bouwsteen",
        description="who tells HAProxy the primary: the project's detector (HTTP checks, detector_port) or an "
                    "existing pgroute66 on the routers (external-check scripts, see pgroute66)",
    )
    pgroute66: Pgroute66Spec | None = Field(default=None, description="with detector: pgroute66; defaults apply if unset")

    @model_validator(mode="after")
    def _detector_settings(self) -> "RoutingSpec":
        if self.detector == "pgroute66":
            # Compared with the default, not model_fields_set: a dumped inventory (with_db_host)
            # carries every field and must validate again.
            if self.detector_port != RoutingSpec.model_fields["detector_port"].default:
                raise ValueError("detector_port: the project's detector does not run with detector: pgroute66; "
                                 "set pgroute66.url to where pgroute66 serves")
        elif self.pgroute66 is not None:
            raise ValueError("pgroute66: set, but detector is 'bouwsteen'; add detector: pgroute66 to use it")
        return self

    @property
    def uses_pgroute66(self) -> bool:
        return self.detector == "pgroute66"

    @property
    def pgroute66_settings(self) -> Pgroute66Spec:
        """The pgroute66 settings in force (defaults when `pgroute66:` is left out)."""
        return self.pgroute66 or Pgroute66Spec()


# --------------------------------------------------------------------------- TAB job sources

# The name of a job source (a flow parameter picks one) and of a job file (its name without .yml).
JOB_SOURCE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
JOB_NAME = r"^[a-z0-9_]+$"
# The source every cluster has unless it opts out: the jobs this repository ships (deployments/jobs).
SHIPPED_JOB_SOURCE = "shipped"
SHIPPED_JOBS_DIRECTORY = Path(__file__).resolve().parents[1] / "deployments" / "jobs"
# A branch or tag name `git clone --branch` takes; git's own ref rules are checked by _git_revision.
GIT_REVISION = r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$"
# A URL of RFC 3986 characters only (no space, no control character, no quote git could choke on).
GIT_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]+$"
GIT_URL_SCHEMES = ("https", "ssh", "file")
_GIT_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_PERCENT_CONTROL = re.compile(r"%([01][0-9A-Fa-f]|7[Ff])")
_GIT_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# A PostgreSQL role name written unquoted (as blocks.prefect_blocks.ROLE_NAME).
PG_ROLE_NAME = r"^[a-z_][a-z0-9_]{0,62}$"


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _git_url(url: str) -> str:
    """https://host/path, ssh://[user@]host[:port]/path or file:///path: what `git clone` is given
    after `--`, and never with credentials (they belong in the worker's git or ssh configuration)."""
    if _PERCENT_CONTROL.search(url):
        raise ValueError("holds a percent-encoded control character")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in GIT_URL_SCHEMES:
        raise ValueError(f"scheme {parts.scheme!r} is not allowed; use one of {', '.join(GIT_URL_SCHEMES)} "
                         "(scp-like git@host:path is written ssh://git@host/path)")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("a file URL names an absolute path on the worker: file:///srv/jobs.git")
        return url
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and (scheme == "https" or not _GIT_SSH_USER.fullmatch(userinfo)):
        raise ValueError("credentials do not belong in the URL (the inventory is no secret): give ssh://user@host/… "
                         "with a key, or https:// with the worker's git credential helper")
    host = parts.hostname or ""
    if not _GIT_HOST.fullmatch(host) and not _is_ip_address(host):
        raise ValueError(f"host {host!r} is not a host name or address")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number in 1-65535") from None
    if port == 0:
        raise ValueError("the port is not a number in 1-65535")
    if not parts.path.startswith("/") or parts.path == "/":
        raise ValueError("the URL names no repository path")
    return url


def _git_revision(revision: str) -> str:
    # git check-ref-format's rules that the pattern leaves open.
    if ".." in revision or "//" in revision or "@{" in revision:
        raise ValueError(f"{revision!r} is not a branch or tag name ('..', '//' and '@{{' are not allowed)")
    if revision.endswith(("/", ".", ".lock")) or any(part.startswith(".") for part in revision.split("/")):
        raise ValueError(f"{revision!r} is not a branch or tag name (a part starts with '.' or it ends in '/', "
                         "'.' or '.lock')")
    return revision


GitUrl = Annotated[str, Field(pattern=GIT_URL, max_length=2048), AfterValidator(_git_url)]
GitRevision = Annotated[str, Field(pattern=GIT_REVISION), AfterValidator(_git_revision)]
JobSourceName = Annotated[str, Field(pattern=JOB_SOURCE_NAME)]
PgRoleName = Annotated[str, Field(pattern=PG_ROLE_NAME)]


class JobSourceSpec(Strict):
    """Where a cluster's TAB job files come from: a directory on the worker, or a git repository
    cloned at one of the listed revisions (the flow's `revision` parameter picks one)."""

    directory: SafePath | None = Field(default=None, description="a folder of *.yml job files on the worker")
    git: GitUrl | None = Field(default=None, description="https://, ssh:// or file:// URL of a repository of jobs")
    revisions: list[GitRevision] = Field(
        default_factory=list, description="branches or tags a run may check out; the first is the default")

    @model_validator(mode="after")
    def _one_kind(self) -> "JobSourceSpec":
        if (self.directory is None) == (self.git is None):
            raise ValueError("give exactly one of directory or git")
        if self.git is not None and not self.revisions:
            raise ValueError("revisions: a git source lists the branches or tags a run may check out (e.g. [main])")
        if self.directory is not None and self.revisions:
            raise ValueError("revisions: only a git source has revisions; a directory is used as it is")
        if len(set(self.revisions)) != len(self.revisions):
            raise ValueError("revisions: a revision is listed twice")
        return self


class JobsSpec(Strict):
    """TAB jobs (the `tab_job` flow): which job sources a run may pick, and what their SQL may do.

    SQL steps log in as the database credentials' job role (`job_user`, NOSUPERUSER NOCREATEDB
    NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT), which is a member of `member_of` and of
    nothing else; a job's connection may name one of those roles as its `user` (then SET ROLE)."""

    sources: dict[JobSourceName, JobSourceSpec] = Field(
        default_factory=dict, description="name → {directory} or {git, revisions}; the flow's `source` picks a name")
    shipped: bool = Field(default=True, description=f"also offer source {SHIPPED_JOB_SOURCE!r}: the jobs this "
                                                     "repository ships (deployments/jobs)")
    member_of: list[PgRoleName] | None = Field(
        default=None, description="roles the job role is a member of (SET ROLE targets of a job's connection); "
                                  "unset: the application role only")

    @field_validator("sources")
    @classmethod
    def _reserved(cls, sources: dict[str, JobSourceSpec]) -> dict[str, JobSourceSpec]:
        if SHIPPED_JOB_SOURCE in sources:
            raise ValueError(f"{SHIPPED_JOB_SOURCE!r} is the name of the jobs this repository ships; "
                             "give your source another name (or set shipped: false)")
        return sources

    @field_validator("member_of")
    @classmethod
    def _unique_roles(cls, roles: list[str] | None) -> list[str] | None:
        if roles is not None and len(set(roles)) != len(roles):
            raise ValueError("a role is listed twice")
        return roles

    @property
    def source_names(self) -> list[str]:
        return ([SHIPPED_JOB_SOURCE] if self.shipped else []) + list(self.sources)

    def source(self, name: str) -> JobSourceSpec | None:
        """The source of that name, None if the cluster has none so named."""
        if name == SHIPPED_JOB_SOURCE and self.shipped:
            # Built here, not declared: the folder is where this code runs, which a stored
            # inventory must not pin (model_construct: the checkout's path need not be a SafePath).
            return JobSourceSpec.model_construct(directory=str(SHIPPED_JOBS_DIRECTORY), git=None, revisions=[])
        return self.sources.get(name)


class ClusterSpec(Strict):
    name: Annotated[str, Field(pattern=CLUSTER_NAME)]
    network: ipaddress.IPv4Network = Field(description="the subnet the cluster's hosts share")
    postgres: PostgresSpec = Field(default_factory=PostgresSpec)
    ha_manager: HaManager = HaManager.patroni
    backup_tool: BackupTool = BackupTool.pgbackrest
    etcd: EtcdSpec = Field(default_factory=EtcdSpec)
    patroni: PatroniSpec = Field(default_factory=PatroniSpec)
    tls: TlsSpec = Field(default_factory=TlsSpec)
    stolon: StolonSpec = Field(default_factory=StolonSpec)
    object_store: ObjectStoreSpec | None = None
    routing: RoutingSpec | None = None
    admin_networks: list[ipaddress.IPv4Network] = Field(
        default_factory=list, description="where the controller (Prefect worker) connects from"
    )
    backup_retention_full: int = Field(default=7, ge=1, le=365)
    jobs: JobsSpec = Field(default_factory=JobsSpec, description="TAB job sources and what their SQL may do")

    @property
    def virtual_router_id(self) -> int:
        if self.routing and self.routing.virtual_router_id:
            return self.routing.virtual_router_id
        # Stable per cluster name, never 0 (VRRP ids are 1..255).
        return int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 255 + 1


class SshSpec(Strict):
    user: str = Field(default="root", pattern=UNIX_USER)
    port: int = Field(default=22, ge=1, le=65535)
    key_file: SafePath | None = Field(default=None, description="on the controller")
    known_hosts_file: SafePath | None = Field(default=None, description="on the controller")


class Inventory(Strict):
    cluster: ClusterSpec
    ssh: SshSpec = Field(default_factory=SshSpec)
    hosts: list[HostSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Inventory":
        seen_names: dict[str, int] = {}
        seen_addresses: dict[str, int] = {}
        for index, host in enumerate(self.hosts):
            if host.name in seen_names:
                raise ValueError(
                    f"hosts[{index}].name: duplicate host {host.name!r} (also hosts[{seen_names[host.name]}])"
                )
            if str(host.address) in seen_addresses:
                raise ValueError(
                    f"hosts[{index}].address: duplicate address {host.address} "
                    f"(also hosts[{seen_addresses[str(host.address)]}])"
                )
            seen_names[host.name] = index
            seen_addresses[str(host.address)] = index
            if host.address not in self.cluster.network:
                raise ValueError(f"hosts[{index}].address: {host.address} is outside cluster.network {self.cluster.network}")
        etcd = self.etcd_members
        if len(etcd) < 3:
            raise ValueError(
                f"hosts: {len(etcd)} etcd member(s) ({', '.join(h.name for h in etcd) or 'none'}); "
                "at least 3 are needed for a quorum that survives one loss"
            )
        explicit_etcd = self.with_role(Role.etcd)
        if len(explicit_etcd) % 2 == 0 and explicit_etcd:
            raise ValueError(
                f"hosts: {len(etcd)} etcd member(s) ({', '.join(h.name for h in etcd)}); an even count survives "
                f"no more losses than {len(etcd) - 1} members do: give the etcd role to an odd number (3, 5, 7)"
            )
        if len(self.db_hosts) < 1:
            raise ValueError("hosts: no host has role 'db'")
        for index, host in enumerate(self.hosts):
            if host.has(Role.db) and host.has(Role.router):
                raise ValueError(
                    f"hosts[{index}].roles: {host.name!r} is both 'db' and 'router'; HAProxy and keepalived "
                    "run on hosts of their own (the rw port would collide with PostgreSQL's)"
                )
        routing = self.cluster.routing
        if routing is not None:
            if routing.vip not in self.cluster.network:
                raise ValueError(f"cluster.routing.vip: {routing.vip} is outside the hosts' subnet {self.cluster.network}")
            if str(routing.vip) in seen_addresses:
                raise ValueError(f"cluster.routing.vip: {routing.vip} is already the address of a host")
            if len(self.with_role(Role.router)) < 1:
                raise ValueError("cluster.routing: set, but no host has role 'router'")
            # keepalived's priorities are 250, 240, ... (routing config), and VRRP's lowest is 1.
            if len(self.with_role(Role.router)) > 25:
                raise ValueError("hosts: at most 25 hosts may have role 'router' (one VRRP group)")
        store = self.cluster.object_store
        if store is not None:
            host = self.find(store.host)
            if host is None or not host.has(Role.backup):
                raise ValueError(f"cluster.object_store.host: {store.host!r} is not a host with role 'backup'")
        self._ports_distinct()
        return self

    def _ports_distinct(self) -> None:
        """Ports that listen on one host must differ (errors name the later field of a pair)."""
        c = self.cluster
        pairs: list[tuple[str, int, str, int]] = [
            ("cluster.etcd.client_port", c.etcd.client_port, "cluster.postgres.port", c.postgres.port),
            ("cluster.etcd.peer_port", c.etcd.peer_port, "cluster.postgres.port", c.postgres.port),
            ("cluster.etcd.peer_port", c.etcd.peer_port, "cluster.etcd.client_port", c.etcd.client_port),
        ]
        if c.ha_manager is HaManager.patroni:
            pairs += [
                ("cluster.patroni.rest_port", c.patroni.rest_port, "cluster.postgres.port", c.postgres.port),
                ("cluster.patroni.rest_port", c.patroni.rest_port, "cluster.etcd.client_port", c.etcd.client_port),
                ("cluster.patroni.rest_port", c.patroni.rest_port, "cluster.etcd.peer_port", c.etcd.peer_port),
                ("cluster.patroni.proxy_port", c.patroni.proxy_port, "cluster.postgres.port", c.postgres.port),
                ("cluster.patroni.proxy_port", c.patroni.proxy_port, "cluster.patroni.rest_port", c.patroni.rest_port),
                ("cluster.patroni.proxy_port", c.patroni.proxy_port, "cluster.etcd.client_port", c.etcd.client_port),
                ("cluster.patroni.proxy_port", c.patroni.proxy_port, "cluster.etcd.peer_port", c.etcd.peer_port),
            ]
        # stolon's proxy_port vs postgres.port: the stolon driver's validate() refuses it (its own wording).
        if c.routing is not None:
            r = c.routing
            pairs += [
                ("cluster.routing.ro_port", r.ro_port, "cluster.routing.rw_port", r.rw_port),
                ("cluster.routing.stats_port", r.stats_port, "cluster.routing.rw_port", r.rw_port),
                ("cluster.routing.stats_port", r.stats_port, "cluster.routing.ro_port", r.ro_port),
            ]
        for field, port, other, other_port in pairs:
            if port == other_port:
                raise ValueError(f"{field}: {port} clashes with {other}")

    # -------------------------------------------------------------- lookups

    def with_role(self, role: Role) -> list[HostSpec]:
        return [h for h in self.hosts if h.has(role)]

    @property
    def db_hosts(self) -> list[HostSpec]:
        return self.with_role(Role.db)

    @property
    def etcd_members(self) -> list[HostSpec]:
        explicit = self.with_role(Role.etcd)
        # Like the building block's labs: without explicit etcd hosts, the db hosts run etcd.
        return explicit or self.db_hosts

    def find(self, name: str) -> HostSpec | None:
        return next((h for h in self.hosts if h.name == name), None)

    def host(self, name: str) -> HostSpec:
        found = self.find(name)
        if found is None:
            raise UnknownHostError(f"unknown host {name!r}; the inventory of cluster {self.cluster.name!r} has "
                                   + ", ".join(h.name for h in self.hosts))
        return found

    def with_db_host(self, name: str) -> "Inventory":
        """The same inventory with `name` added to the database hosts (after add_standby).

        etcd membership does not follow: when the db hosts were the implicit etcd members, they
        are pinned with an explicit etcd role first, so the new standby is only an etcd client.
        """
        pin_etcd = not self.with_role(Role.etcd)
        current_etcd = {h.name for h in self.etcd_members}
        hosts = []
        for h in self.hosts:
            roles = list(h.roles)
            if pin_etcd and h.name in current_etcd and Role.etcd not in roles:
                roles.append(Role.etcd)
            if h.name == name and Role.db not in roles:
                roles.append(Role.db)
            hosts.append(h.model_copy(update={"roles": roles}))
        return Inventory.model_validate({**self.model_dump(mode="json"), "hosts": [h.model_dump(mode="json") for h in hosts]})

    def without_member(self, name: str) -> "Inventory":
        """The same inventory with `name` no longer a database host nor an etcd member (after
        remove_member). The host stays listed, with its other roles, so its data directory and
        keys are still found; the other etcd members are pinned first, as in `with_db_host`."""
        return self._moved(name, None)

    def replacing(self, dead: str, new: str) -> "Inventory":
        """`new` takes `dead`'s place (after replace_member): the database role, and the etcd
        role when `dead` had one."""
        return self._moved(dead, new)

    def _moved(self, leaving: str, joining: str | None) -> "Inventory":
        current_etcd = {h.name for h in self.etcd_members}
        hosts = []
        for h in self.hosts:
            roles = [r for r in h.roles if r is not Role.etcd or h.name != leaving]
            if h.name in current_etcd and h.name != leaving and Role.etcd not in roles:
                roles.append(Role.etcd)
            if h.name == leaving:
                roles = [r for r in roles if r is not Role.db]
            if h.name == joining:
                roles += [r for r in (Role.db, Role.etcd if leaving in current_etcd else None)
                          if r is not None and r not in roles]
            hosts.append(h.model_copy(update={"roles": roles}))
        return Inventory.model_validate({**self.model_dump(mode="json"), "hosts": [h.model_dump(mode="json") for h in hosts]})


class UnknownHostError(BouwsteenError, ValueError):
    pass


class InventoryError(BouwsteenError, ValueError):
    """An inventory that cannot be used; the message names the file, the field and the reason."""


def _location(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        where = _location(tuple(err["loc"]))
        lines.append(f"{source}: {where + ': ' if where else ''}{msg}")
    return "\n".join(lines)


def parse_inventory(data: Any, source: str = "<inventory>") -> Inventory:
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        raise InventoryError(format_validation_error(source, exc)) from None


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InventoryError(f"{path}:{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: expected a mapping with cluster, ssh and hosts")
    return parse_inventory(data, str(path))

