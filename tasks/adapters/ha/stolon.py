"""The stolon HA driver (production): keeper, sentinel and proxy per database host, state in etcd v3.

Contract: /work/shared/reference/stolon.md. Things this driver relies on that are easy to get wrong:

- `stolonctl status --format json` prints `{}` and exits 0 on *any* error (store down, no
  clusterdata). Only a document with a `cluster` key is a status; everything else is an error,
  except `{}` together with `clusterdata read` failing with `nil cluster data`, which is the one
  trustworthy signal that the cluster was never initialised.
- The master is a DB uid (`.cluster.status.master`), not a keeper uid; the keeper is
  `.dbs[master].spec.keeperUID`. Status and clusterdata are two reads, so they are cross-checked.
- stolonctl reads only root flags from the environment, so every command passes all flags.
- Passwords reach the keeper through `--pg-{su,repl}-passwordfile` files (0600, owner postgres)
  holding the bare password: the keeper reads the file as is, then strips trailing CR/LF with a
  warning on every start, so the files carry no trailing newline.
- The keeper owns some PostgreSQL parameters (stolon's `managedPGParameters`): it writes its own
  value, takes it from another spec field, or the sentinel drops it from `pgParameters` at init.
  They are refused wherever a user's parameters enter the spec, never passed on to be ignored.
- `stolonctl update --patch` is a Kubernetes strategic merge patch on the ClusterSpec struct, which
  has no patch-strategy tags: maps (`pgParameters`) merge and `null` removes a key, lists
  (`pgHBA`, `additionalMasterReplicationSlots`) are replaced whole. So a patch always carries
  the complete pgHBA list.
- The cluster spec file is read once, by `stolonctl init`. Later changes go through
  `stolonctl update --patch` (`settings_commands`, `spec_update_commands`), never by re-init:
  `init -y` creates a new cluster uid and keepers then discard their data.
- With `cluster.tls.enabled` the keeper needs the pgvillage fork's flags (v0.18.0 or later):
  `--pg-{su,repl}-connection-type hostssl` and `--pg-{su,repl}-auth-method cert`. The fork has no
  flag for a client certificate: its connections to a peer (walreceiver, pg_basebackup, pg_rewind)
  take libpq's PGSSLCERT/PGSSLKEY/PGSSLROOTCERT from the keeper's environment, which postgres
  inherits. That is one identity for every connection, and the fork turns `cert` into `peer` on
  the socket, where the keeper also logs in as its replication user; so with TLS on the keeper
  replicates as the superuser, which must be the OS user postgres (as PgVillage deploys it).
- With `cluster.tls.enabled` etcd takes https only and wants a client certificate of the cluster's
  CA. Every component and every stolonctl command then gets https store endpoints (the scheme
  alone turns TLS on, and all endpoints must share it) and stolon's common flags
  `--store-cert-file`, `--store-key` (no `-file`) and `--store-ca-file` with the database host's
  etcd client pair (cmd/common.go, v0.17.0, master and the fork). The units run as User=postgres,
  which owns the key (0600); stolonctl runs as the session's root, which can read it as well.

Production installs the `stolon` RPM/deb from the site's repository (binaries in
/usr/local/bin, as PgVillage's package does); no public registry carries it.
"""

from __future__ import annotations

import difflib
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Literal

from blocks.inventory import HostSpec, Inventory, Role
from tasks.adapters import etcd_config, pki
from tasks.adapters.commands import (
    Command,
    CommandResult,
    ManagedFile,
    Unit,
    cmd,
    script,
)
from tasks.adapters.ha.base import (
    ClusterView,
    DbSecrets,
    HaDriver,
    HaSettings,
    HaSpecError,
    HaStatusError,
    Member,
)

STOLON_BIN_DIR = "/usr/local/bin"
STOLONCTL = f"{STOLON_BIN_DIR}/stolonctl"
STORE_BACKEND = "etcdv3"
OS_USER = "postgres"
PROXY_LISTEN_ADDRESS = "0.0.0.0"
SPEC_FIELD_PREFIX = "cluster.stolon.cluster_spec"

# `md5` in pg_hba also accepts SCRAM verifiers (the server negotiates SCRAM when the stored
# password is SCRAM), so roles hashed either way can log in; it matches the keeper's own
# default --pg-{su,repl}-auth-method.
HBA_AUTH_METHOD = "md5"

# With cluster.tls.enabled, as the Patroni driver sets them. Cluster-wide here (pgParameters is one
# map in the spec): desired.db_files installs the files on every database host before the keeper's.
TLS_PG_PARAMETERS: dict[str, str] = {
    "ssl": "on",
    "ssl_cert_file": pki.PG_SERVER_CERT,
    "ssl_key_file": pki.PG_SERVER_KEY,
    "ssl_ca_file": pki.PG_CA,
    "ssl_min_protocol_version": "TLSv1.2",
}
# The fork maps `cert` to `peer` for the keeper's own socket lines (`local postgres <su> peer`,
# `local replication <repl> peer`), and the keeper runs as this OS user.
TLS_SUPERUSER = OS_USER
# pg_hba connection types that let a TCP client in without TLS.
_NON_TLS_HBA_TYPES = frozenset({"host", "hostnossl", "hostgssenc", "hostnogssenc"})

STATUS_TIMEOUT = 30.0
INIT_TIMEOUT = 120.0
FAILKEEPER_TIMEOUT = 30.0
# `update` retries its compare-and-swap write up to 3 times against the store.
UPDATE_TIMEOUT = 60.0
# The keeper stops PostgreSQL on SIGTERM; a shutdown checkpoint can take a while.
KEEPER_STOP_TIMEOUT_SECONDS = 180

NIL_CLUSTER_DATA = "nil cluster data"

# pitr_init_commands' program, run on the host by its python3: the spec file host_files wrote
# with the pitr fields on top, as stolonctl's argument. The fields replace whole blocks, so a
# pitrConfig the inventory carries (an old target) never reaches this restore.
_PITR_INIT = (
    "import json, os, sys\n"
    "spec_path, pitr, *stolonctl = sys.argv[1:]\n"
    "with open(spec_path) as spec_file:\n"
    "    spec = json.load(spec_file)\n"
    "spec.update(json.loads(pitr))\n"
    "os.execv(stolonctl[0], [*stolonctl, 'init', '-y', json.dumps(spec, sort_keys=True)])\n"
)

# ------------------------------------------------------------------ cluster spec schema

_DURATION = "duration"
_UINT16 = "uint16"
_UINT32 = "uint32"
_BOOL = "bool"
_STRING = "string"
_STRING_MAP = "string map"
_STRING_LIST = "string list"

_ARCHIVE_RECOVERY_SETTINGS: dict[str, Any] = {"restoreCommand": _STRING}
_STANDBY_SETTINGS: dict[str, Any] = {
    "primaryConninfo": _STRING,
    "primarySlotName": _STRING,
    "recoveryMinApplyDelay": _STRING,
}
_RECOVERY_TARGET_SETTINGS: dict[str, Any] = {
    "recoveryTarget": _STRING,
    "recoveryTargetLsn": _STRING,
    "recoveryTargetName": _STRING,
    "recoveryTargetTime": _STRING,
    "recoveryTargetXid": _STRING,
    "recoveryTargetTimeline": _STRING,
}

# stolon's ClusterSpec (internal/cluster/cluster.go, v0.17.0 and the pgvillage fork). Go's JSON
# decoder silently drops unknown keys, so a typo here would otherwise be a setting that never
# takes effect.
CLUSTER_SPEC_SCHEMA: dict[str, Any] = {
    "sleepInterval": _DURATION,
    "requestTimeout": _DURATION,
    "convergenceTimeout": _DURATION,
    "initTimeout": _DURATION,
    "syncTimeout": _DURATION,
    "dbWaitReadyTimeout": _DURATION,
    "failInterval": _DURATION,
    "deadKeeperRemovalInterval": _DURATION,
    "proxyCheckInterval": _DURATION,
    "proxyTimeout": _DURATION,
    "maxStandbys": _UINT16,
    "maxStandbysPerSender": _UINT16,
    "maxStandbyLag": _UINT32,
    "synchronousReplication": _BOOL,
    "minSynchronousStandbys": _UINT16,
    "maxSynchronousStandbys": _UINT16,
    "additionalWalSenders": _UINT16,
    "additionalMasterReplicationSlots": _STRING_LIST,
    "usePgrewind": _BOOL,
    "initMode": ("new", "existing", "pitr"),
    "mergePgParameters": _BOOL,
    "role": ("master", "standby"),
    "newConfig": {"locale": _STRING, "encoding": _STRING, "dataChecksums": _BOOL},
    "pitrConfig": {
        "dataRestoreCommand": _STRING,
        "archiveRecoverySettings": _ARCHIVE_RECOVERY_SETTINGS,
        "recoveryTargetSettings": _RECOVERY_TARGET_SETTINGS,
    },
    "existingConfig": {"keeperUID": _STRING},
    "standbyConfig": {
        "standbySettings": _STANDBY_SETTINGS,
        "archiveRecoverySettings": _ARCHIVE_RECOVERY_SETTINGS,
    },
    "defaultSUReplAccessMode": ("all", "strict"),
    "pgParameters": _STRING_MAP,
    "pgHBA": _STRING_LIST,
    "automaticPgRestart": _BOOL,
}

# Fields people put at the wrong level (older docs and other tools name them this way).
_MISPLACED_FIELDS = {
    "standbySettings": "standbyConfig.standbySettings",
    "archiveRecoverySettings": "standbyConfig.archiveRecoverySettings or pitrConfig.archiveRecoverySettings",
    "keeperUID": "existingConfig.keeperUID",
    "dataRestoreCommand": "pitrConfig.dataRestoreCommand",
}

# stolon's defaults, for checks that compare fields (e.g. an override of proxyTimeout alone).
STOLON_SPEC_DEFAULTS: dict[str, Any] = {
    "proxyCheckInterval": "5s",
    "proxyTimeout": "15s",
    "maxStandbys": 20,
    "maxStandbysPerSender": 3,
    "minSynchronousStandbys": 1,
    "maxSynchronousStandbys": 1,
    "role": "master",
    "defaultSUReplAccessMode": "all",
}

# stolon's `managedPGParameters` (cmd/keeper/cmd/keeper.go, v0.17.0, master and the pgvillage
# fork alike), each with where its value really comes from. The keeper overwrites most of them
# when it writes postgresql.conf, builds the recovery ones from standbyConfig / pitrConfig, and
# leaves all of them out of the parameters it reports, so with mergePgParameters (on by default)
# the sentinel drops them from pgParameters when the cluster is initialised.
_MANAGED_PG_PARAMETER_SOURCES: dict[str, str] = {
    "unix_socket_directories": "the keeper always sets it to /tmp",
    "wal_keep_segments": "the keeper writes it (at least 8) and stolon drops it from pgParameters at init",
    "wal_keep_size": "the keeper writes it (default 128MB) and stolon drops it from pgParameters at init",
    "hot_standby": "the keeper always sets it to on",
    "listen_addresses": "the keeper sets it from --pg-listen-address (the host's inventory address)",
    "port": "the keeper sets it from --pg-port; set cluster.postgres.port",
    "max_replication_slots": "the keeper sets it to maxStandbys",
    "max_wal_senders": "the keeper sets it from maxStandbys and additionalWalSenders",
    "wal_log_hints": "the keeper sets it on with usePgrewind and stolon drops it from pgParameters at init",
    "synchronous_standby_names": "the keeper sets it from synchronousReplication; set cluster.postgres.synchronous_replication",
    "primary_conninfo": "the keeper builds it for its standbys; a standby cluster takes standbyConfig.standbySettings.primaryConninfo",
    "primary_slot_name": "the keeper uses slot stolon_<db uid>; a standby cluster takes standbyConfig.standbySettings.primarySlotName",
    "recovery_min_apply_delay": "set standbyConfig.standbySettings.recoveryMinApplyDelay",
    "restore_command": "set standbyConfig.archiveRecoverySettings.restoreCommand or pitrConfig.archiveRecoverySettings.restoreCommand",
    "recovery_target": "set pitrConfig.recoveryTargetSettings.recoveryTarget",
    "recovery_target_lsn": "set pitrConfig.recoveryTargetSettings.recoveryTargetLsn",
    "recovery_target_name": "set pitrConfig.recoveryTargetSettings.recoveryTargetName",
    "recovery_target_time": "set pitrConfig.recoveryTargetSettings.recoveryTargetTime",
    "recovery_target_xid": "set pitrConfig.recoveryTargetSettings.recoveryTargetXid",
    "recovery_target_timeline": "the keeper sets latest; set pitrConfig.recoveryTargetSettings.recoveryTargetTimeline",
    "recovery_target_action": "the keeper sets promote whenever pitrConfig.recoveryTargetSettings is set",
}
STOLON_MANAGED_PG_PARAMETERS = frozenset(_MANAGED_PG_PARAMETER_SOURCES)
# Not in that list, but the keeper writes wal_level = replica unless pgParameters["wal_level"]
# is exactly "logical" (case-sensitive; PostgreSQL itself would accept "LOGICAL").
_KEEPER_KEPT_WAL_LEVELS = frozenset({"logical"})

_GO_DURATION = re.compile(r"^[-+]?(?:0|(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)$")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
# PostgreSQL's rule for slot names, as stolon checks them; `stolon_` slots are stolon's own.
_REPLICATION_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")
# Characters an EnvironmentFile value may hold unquoted without any systemd parsing surprises.
_ENV_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("20s", "1m30s", "0"); ValueError when Go would reject it."""
    if not isinstance(text, str) or not _GO_DURATION.match(text):
        raise ValueError(f"not a Go duration: {text!r}")
    sign = -1.0 if text.startswith("-") else 1.0
    total = sum(float(number) * _GO_DURATION_UNIT_SECONDS[unit] for number, unit in _GO_DURATION_PART.findall(text))
    return sign * total


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, `None` removes a key, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    merged: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _check_against_schema(value: Any, schema: Any, path: str, problems: list[str]) -> None:
    # None is a merge-patch removal ("drop the driver's default"); the merged spec is checked later.
    if value is None:
        return
    if isinstance(schema, dict):
        if not isinstance(value, Mapping):
            problems.append(f"{path}: must be an object, got {type(value).__name__}")
            return
        for key, item in value.items():
            if key not in schema:
                problems.append(f"{path}.{key}: unknown stolon cluster spec field{_suggestion(str(key), schema)}")
                continue
            _check_against_schema(item, schema[key], f"{path}.{key}", problems)
    elif isinstance(schema, tuple):
        if value not in schema:
            problems.append(f"{path}: must be one of {', '.join(schema)}, got {value!r}")
    elif schema == _DURATION:
        if not isinstance(value, str):
            problems.append(f"{path}: must be a Go duration string such as \"20s\" or \"5m\", got {value!r}")
            return
        try:
            seconds = parse_go_duration(value)
        except ValueError:
            problems.append(f"{path}: {value!r} is not a Go duration (use e.g. \"500ms\", \"20s\", \"5m\", \"48h\")")
            return
        if seconds < 0:
            problems.append(f"{path}: must not be negative, got {value!r}")
    elif schema in (_UINT16, _UINT32):
        limit = 0xFFFF if schema == _UINT16 else 0xFFFFFFFF
        # bool is an int in Python; stolon would reject `true` for a number.
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: must be an integer, got {value!r}")
        elif not 0 <= value <= limit:
            problems.append(f"{path}: must be between 0 and {limit}, got {value}")
    elif schema == _BOOL:
        if not isinstance(value, bool):
            problems.append(f"{path}: must be true or false, got {value!r}")
    elif schema == _STRING:
        if not isinstance(value, str):
            problems.append(f"{path}: must be a string, got {value!r}")
    elif schema == _STRING_MAP:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: must be a map of parameter name to string value")
            return
        for key, item in value.items():
            # A None value removes an inherited parameter (merge patch).
            if item is not None and not isinstance(item, str):
                problems.append(f"{path}.{key}: must be a string (stolon rejects {type(item).__name__}s), e.g. \"{item}\"")
    elif schema == _STRING_LIST:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append(f"{path}: must be a list of strings")
    else:  # pragma: no cover - a schema typo, not an input error
        raise AssertionError(f"unknown schema kind {schema!r}")


def _suggestion(key: str, schema: Mapping[str, Any]) -> str:
    if key in _MISPLACED_FIELDS:
        return f" (did you mean {_MISPLACED_FIELDS[key]}?)"
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _duration_seconds(spec: Mapping[str, Any], field: str) -> float | None:
    value = spec.get(field, STOLON_SPEC_DEFAULTS.get(field))
    try:
        return parse_go_duration(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _uint(spec: Mapping[str, Any], field: str) -> int | None:
    value = spec.get(field, STOLON_SPEC_DEFAULTS.get(field))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _managed_parameter_problems(parameters: Mapping[str, Any], where: str) -> list[str]:
    """Parameters a user may not put in pgParameters, one message per parameter naming
    `<where>.<name>`. Names compare case-insensitively: PostgreSQL does, and the keeper would
    write its own `port` next to a user's `Port` in random order."""
    problems: list[str] = []
    for name, value in parameters.items():
        if value is None:  # a merge-patch removal, not a setting
            continue
        lowered = str(name).lower()
        if lowered in STOLON_MANAGED_PG_PARAMETERS:
            problems.append(
                f"{where}.{name}: managed by the stolon keeper, not settable through pgParameters "
                f"({_MANAGED_PG_PARAMETER_SOURCES[lowered]})"
            )
        elif lowered == "wal_level" and (
            name != "wal_level"
            or (isinstance(value, str) and value not in _KEEPER_KEPT_WAL_LEVELS and value.strip().lower() in ("logical", "minimal"))
        ):
            problems.append(
                f"{where}.{name}: the stolon keeper writes wal_level = replica unless the parameter is "
                f"named wal_level with the value exactly 'logical', got {value!r}"
            )
    return problems


def _tls_parameter_problems(parameters: Mapping[str, Any], where: str) -> list[str]:
    """With TLS on: the parameters bouwsteen sets for it, one message per name found. A `null`
    (merge-patch removal) is refused too: dropping `ssl` would turn TLS off behind the inventory."""
    return [
        f"{where}.{name}: set by bouwsteen while cluster.tls.enabled is true (to the cluster CA's files in "
        f"{pki.PG_TLS_DIR}); remove it"
        for name in parameters
        if str(name).lower() in TLS_PG_PARAMETERS
    ]


def _tls_hba_problems(pg_hba: Any, where: str) -> list[str]:
    """With TLS on: pgHBA entries that would let a TCP client in without TLS."""
    problems: list[str] = []
    for index, line in enumerate(pg_hba if isinstance(pg_hba, list) else []):
        words = str(line).split()
        if words and words[0].lower() in _NON_TLS_HBA_TYPES:
            problems.append(
                f"{where}[{index}]: a {words[0]!r} entry while cluster.tls.enabled is true; TCP entries must be hostssl"
            )
    return problems


# ------------------------------------------------------------------ status text (fallback)


def parse_status_text(text: str) -> dict[str, Any]:
    """`stolonctl status` text output in the shape of its JSON output (sentinels, proxies,
    keepers, cluster). For old builds and pasted output; `--format json` is the primary source.

    Columns are tab-padded by Go's tabwriter; pasted copies often have spaces instead, so a run
    of tabs or of two or more spaces separates cells ("(no db assigned)" keeps its single spaces).
    """
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for raw_line in text.splitlines():
        line = raw_line.rstrip()
        header = re.match(r"^=+\s*(.+?)\s*=+$", line.strip())
        if header:
            current = header.group(1)
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line)
    if "Keepers" not in sections:
        raise HaStatusError("not `stolonctl status` output: no '=== Keepers ===' section")

    def cells(line: str) -> list[str]:
        return [cell for cell in re.split(r"\t+| {2,}", line.strip()) if cell]

    sentinels = [
        {"uid": row[0], "leader": row[1] == "true"}
        for row in map(cells, sections.get("Active sentinels", []))
        if len(row) >= 2 and row[0] != "ID"
    ]
    proxies = [
        {"uid": row[0]}
        for row in map(cells, sections.get("Active proxies", []))
        if row and row[0] != "ID" and not row[0].startswith("No ")
    ]
    keepers: list[dict[str, Any]] = []
    cluster: dict[str, Any] = {"available": False, "master_keeper_uid": "", "master_db_uid": ""}
    for line in sections["Keepers"]:
        row = cells(line)
        if line.strip() == "No cluster available":
            continue
        if not row or row[0] == "UID" or line.strip() == "No keepers available":
            continue
        if len(row) < 3:
            raise HaStatusError(f"cannot read keeper line {line.strip()!r} of `stolonctl status`")
        keeper: dict[str, Any] = {"uid": row[0], "healthy": row[1] == "true", "listen_address": row[2]}
        if len(row) >= 6:
            keeper.update(
                pg_healthy=row[3] == "true",
                pg_wanted_generation=int(row[4]),
                pg_current_generation=int(row[5]),
            )
        else:
            keeper.update(pg_healthy=False, pg_wanted_generation=0, pg_current_generation=0)
        keepers.append(keeper)
    info_lines = sections.get("Cluster Info", [])
    for line in info_lines:
        # Pre-v0.14 builds print "Master: <uid>".
        found = re.match(r"^\s*Master(?: Keeper)?:\s*(\S+)\s*$", line)
        if found:
            cluster["available"] = True
            cluster["master_keeper_uid"] = "" if found.group(1) == "(none)" else found.group(1)
    return {"sentinels": sentinels, "proxies": proxies, "keepers": keepers, "cluster": cluster}


# ------------------------------------------------------------------ the driver


class StolonDriver(HaDriver):
    """stolon keeper/sentinel/proxy per database host; one stolon cluster per inventory cluster.

    Keeper uid = inventory host name with '-' replaced by '_' (stolon uids allow only lower-case
    letters, digits and '_'); it must never change once a keeper has initialised its data dir.
    """

    name = "stolon"
    # `failkeeper` marks the master failed; the sentinel then elects the best standby itself.
    targets_candidate = False
    # `initMode: pitr`: one keeper restores the backup and recovers, the others resync from it.
    restores_itself = True
    # can_drain stays False: the keeper's --can-be-master and --can-be-synchronous-replica are
    # start flags, so draining a keeper would take the very restart it is meant to cover.

    # -------------------------------------------------------------- names and paths

    @staticmethod
    def keeper_uid(host_name: str) -> str:
        return host_name.replace("-", "_")

    @staticmethod
    def keeper_data_dir(inv: Inventory) -> str:
        """The keeper's --data-dir; PostgreSQL's PGDATA is `<this>/postgres`."""
        return inv.cluster.postgres.data_directory or f"/var/lib/stolon/{inv.cluster.name}"

    def pgdata(self, inv: Inventory) -> str:
        return posixpath.join(self.keeper_data_dir(inv), "postgres")

    @staticmethod
    def config_dir(inv: Inventory) -> str:
        return f"/etc/stolon/{inv.cluster.name}"

    def cluster_spec_path(self, inv: Inventory) -> str:
        return f"{self.config_dir(inv)}/cluster-spec.json"

    def su_password_path(self, inv: Inventory) -> str:
        return f"{self.config_dir(inv)}/pg-su-password"

    def repl_password_path(self, inv: Inventory) -> str:
        return f"{self.config_dir(inv)}/pg-repl-password"

    @staticmethod
    def env_file_path(inv: Inventory, component: str) -> str:
        """component: keeper | sentinel | proxy (file names follow the building block)."""
        return f"/etc/sysconfig/stolon-st{component}-{inv.cluster.name}"

    @staticmethod
    def unit_name(inv: Inventory, component: str) -> str:
        return f"stolon-{component}-{inv.cluster.name}.service"

    def unit_path(self, inv: Inventory, component: str) -> str:
        return f"/etc/systemd/system/{self.unit_name(inv, component)}"

    @staticmethod
    def store_endpoints(inv: Inventory) -> str:
        # https:// with TLS on: stolon's store client dials TLS when the endpoints' scheme is https.
        return ",".join(etcd_config.client_urls(inv))

    @staticmethod
    def store_tls_flags(inv: Inventory) -> dict[str, str]:
        """stolon's common store flags (name without `--`) for the etcd client pair; {} with TLS off."""
        if not inv.cluster.tls.enabled:
            return {}
        crt, key = pki.pg_client_pair(pki.ETCD_CLIENT)
        return {"store-cert-file": crt, "store-key": key, "store-ca-file": pki.PG_CA}

    @staticmethod
    def store_tls_paths(inv: Inventory) -> tuple[str, ...]:
        """The files the store client reads (the etcd client pair and the CA); () with TLS off."""
        if not inv.cluster.tls.enabled:
            return ()
        return (*pki.pg_client_pair(pki.ETCD_CLIENT), pki.PG_CA)

    def _keeper_to_host(self, inv: Inventory) -> dict[str, str]:
        # All hosts, not only db hosts: a standby being added has its keeper running before the
        # inventory lists it as a db host.
        return {self.keeper_uid(host.name): host.name for host in inv.hosts}

    # -------------------------------------------------------------- HaDriver

    def packages(self, inv: Inventory) -> list[str]:
        # "stolon" comes from the site's repository (PgVillage's RPM); no public registry has it.
        return [inv.cluster.postgres.package, "stolon"]

    def validate(self, inv: Inventory) -> None:
        problems: list[str] = []
        stolon = inv.cluster.stolon
        if stolon.proxy_port == inv.cluster.postgres.port:
            problems.append("cluster.stolon.proxy_port: clashes with cluster.postgres.port (both listen on every db host)")
        if stolon.proxy_port in (inv.cluster.etcd.client_port, inv.cluster.etcd.peer_port):
            problems.append("cluster.stolon.proxy_port: clashes with an etcd port")
        data_directory = inv.cluster.postgres.data_directory
        if data_directory is not None and not _ENV_SAFE_VALUE.match(data_directory):
            problems.append(
                f"cluster.postgres.data_directory: {data_directory!r} has characters (spaces, quotes, $) that "
                "systemd unit and environment files cannot carry unquoted"
            )

        overrides = stolon.cluster_spec
        _check_against_schema(overrides, CLUSTER_SPEC_SCHEMA, SPEC_FIELD_PREFIX, problems)
        if problems:
            raise HaSpecError("\n".join(problems))

        wanted_sync = inv.cluster.postgres.synchronous_replication
        if "synchronousReplication" in overrides and overrides["synchronousReplication"] != wanted_sync:
            problems.append(
                f"{SPEC_FIELD_PREFIX}.synchronousReplication: {overrides['synchronousReplication']} contradicts "
                f"cluster.postgres.synchronous_replication ({wanted_sync}); set it only there"
            )
        # Both end up in the spec's pgParameters (_render_spec), so both are checked.
        problems += _managed_parameter_problems(inv.cluster.postgres.parameters, "cluster.postgres.parameters")
        problems += _managed_parameter_problems(overrides.get("pgParameters") or {}, f"{SPEC_FIELD_PREFIX}.pgParameters")
        if inv.cluster.tls.enabled:
            problems += _tls_parameter_problems(inv.cluster.postgres.parameters, "cluster.postgres.parameters")
            if "pgParameters" in overrides and overrides["pgParameters"] is None:
                problems.append(
                    f"{SPEC_FIELD_PREFIX}.pgParameters: null would drop the TLS parameters while cluster.tls.enabled is true"
                )
            problems += _tls_parameter_problems(overrides.get("pgParameters") or {}, f"{SPEC_FIELD_PREFIX}.pgParameters")
            problems += _tls_hba_problems(overrides.get("pgHBA"), f"{SPEC_FIELD_PREFIX}.pgHBA")
        for index, slot in enumerate(overrides.get("additionalMasterReplicationSlots") or []):
            if not _REPLICATION_SLOT.match(slot):
                problems.append(
                    f"{SPEC_FIELD_PREFIX}.additionalMasterReplicationSlots[{index}]: {slot!r} is not a valid slot name "
                    "(lower-case letters, digits, '_', at most 63)"
                )
            elif slot.startswith("stolon_"):
                problems.append(
                    f"{SPEC_FIELD_PREFIX}.additionalMasterReplicationSlots[{index}]: {slot!r} uses stolon's reserved prefix"
                )

        spec = self._render_spec(inv, {})
        problems += self._cross_field_problems(inv, spec, overrides)
        if problems:
            raise HaSpecError("\n".join(problems))

    def _cross_field_problems(self, inv: Inventory, spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[str]:
        """Checks stolon's ClusterSpec.Validate does, on the spec as it will be initialised."""
        problems: list[str] = []

        def where(field: str) -> str:
            return f"{SPEC_FIELD_PREFIX}.{field}"

        check_interval = _duration_seconds(spec, "proxyCheckInterval")
        proxy_timeout = _duration_seconds(spec, "proxyTimeout")
        if check_interval is not None and proxy_timeout is not None and check_interval >= proxy_timeout:
            field = "proxyCheckInterval" if "proxyCheckInterval" in overrides else "proxyTimeout"
            problems.append(
                f"{where(field)}: proxyCheckInterval "
                f"({spec.get('proxyCheckInterval', STOLON_SPEC_DEFAULTS['proxyCheckInterval'])}) must be less than "
                f"proxyTimeout ({spec.get('proxyTimeout', STOLON_SPEC_DEFAULTS['proxyTimeout'])})"
            )
        for field in ("maxStandbys", "maxStandbysPerSender", "minSynchronousStandbys", "maxSynchronousStandbys"):
            value = _uint(spec, field)
            if value is not None and value < 1:
                # v0.17.0 rejects 0 for minSynchronousStandbys; only unreleased master accepts it.
                problems.append(f"{where(field)}: must be at least 1 (stolon v0.17.0), got {value}")
        min_sync, max_sync = _uint(spec, "minSynchronousStandbys"), _uint(spec, "maxSynchronousStandbys")
        if min_sync is not None and max_sync is not None and 1 <= max_sync < min_sync:
            problems.append(
                f"{where('maxSynchronousStandbys')}: ({max_sync}) must be at least minSynchronousStandbys ({min_sync})"
            )
        for index, line in enumerate(spec.get("pgHBA") or []):
            if "\n" in line or "\r" in line:
                problems.append(f"{where('pgHBA')}[{index}]: an entry must be one line")

        init_mode = spec.get("initMode")
        role = spec.get("role", STOLON_SPEC_DEFAULTS["role"])
        if init_mode is None:
            problems.append(f"{where('initMode')}: required (new, existing or pitr); it must not be removed")
        elif init_mode == "new" and role == "standby":
            problems.append(f"{where('role')}: a standby cluster cannot use initMode new (use pitr or existing)")
        elif init_mode == "existing":
            keeper = (spec.get("existingConfig") or {}).get("keeperUID", "")
            known = sorted(self.keeper_uid(h.name) for h in inv.db_hosts)
            if not keeper:
                problems.append(f"{where('existingConfig.keeperUID')}: required when initMode is existing")
            elif keeper not in known:
                problems.append(
                    f"{where('existingConfig.keeperUID')}: {keeper!r} is not the keeper uid of a db host ({', '.join(known)})"
                )
        elif init_mode == "pitr":
            pitr = spec.get("pitrConfig") or {}
            if not pitr.get("dataRestoreCommand"):
                problems.append(f"{where('pitrConfig.dataRestoreCommand')}: required when initMode is pitr")
            if pitr.get("recoveryTargetSettings") is not None and role == "standby":
                problems.append(f"{where('pitrConfig.recoveryTargetSettings')}: not allowed when role is standby")
        if role == "standby" and not spec.get("standbyConfig"):
            problems.append(f"{where('standbyConfig')}: required when role is standby")
        return problems

    def etcd_prefix(self, inv: Inventory) -> str:
        # stolon joins with Go's filepath.Join: verbatim prefix (no leading slash by default),
        # duplicate and trailing slashes cleaned.
        joined = posixpath.join(inv.cluster.stolon.store_prefix, inv.cluster.name)
        return re.sub(r"/{2,}", "/", posixpath.normpath(joined))

    def cluster_spec(self, inv: Inventory, extra_parameters: Mapping[str, str]) -> dict[str, Any]:
        """The spec `stolonctl init` loads: this driver's defaults merged with the inventory's
        `cluster.stolon.cluster_spec` (as a JSON merge patch: `null` drops a default)."""
        self.validate(inv)
        return self._render_spec(inv, extra_parameters)

    def _render_spec(self, inv: Inventory, extra_parameters: Mapping[str, str]) -> dict[str, Any]:
        postgres = inv.cluster.postgres
        # validate() checked the inventory's parameters; these come from the backup driver.
        tls = inv.cluster.tls.enabled
        problems = _managed_parameter_problems(extra_parameters, "archive_parameters")
        if tls:
            problems += _tls_parameter_problems(extra_parameters, "archive_parameters")
        if problems:
            raise HaSpecError("\n".join(problems))
        # The backup driver's archive settings win over the inventory's generic parameters:
        # without them WAL archiving, and so every backup, silently breaks.
        parameters = {**postgres.parameters, **extra_parameters, **(TLS_PG_PARAMETERS if tls else {})}
        base: dict[str, Any] = {
            "initMode": "new",
            "synchronousReplication": postgres.synchronous_replication,
            "usePgrewind": True,
            # archive_mode and other restart-only parameters apply only with this on.
            "automaticPgRestart": True,
            # The master accepts superuser/replication connections only from its standbys.
            "defaultSUReplAccessMode": "strict",
            "pgParameters": parameters,
            "pgHBA": self._hba_lines(inv),
        }
        return merge_patch(base, inv.cluster.stolon.cluster_spec)

    def _hba_lines(self, inv: Inventory) -> list[str]:
        # Setting pgHBA replaces stolon's default "host all all 0.0.0.0/0 md5"; these lines scope
        # TCP access to the cluster's own hosts and the admin networks.
        # `all` rather than the replication user's name: the spec is rendered without secrets,
        # and a replication connection still needs the REPLICATION attribute and a password (TLS
        # on: a certificate from the cluster CA whose common name is the role).
        # TLS on: hostssl only, and the superuser logs in with its certificate alone, as under
        # Patroni; TLS on requires it to be TLS_SUPERUSER, so the spec can name it.
        tls = inv.cluster.tls.enabled
        tcp = "hostssl" if tls else "host"
        cert = "cert" if tls else HBA_AUTH_METHOD
        password = "scram-sha-256" if tls else HBA_AUTH_METHOD
        lines: list[str] = []
        db_addresses = [f"{host.address}/32" for host in inv.db_hosts]
        for address in db_addresses:
            lines.append(f"{tcp} replication all {address} {cert}")
        # stolon-proxy relays clients from the db host it runs on, so the master sees those addresses.
        client_addresses = [
            *db_addresses,
            *(f"{host.address}/32" for host in inv.with_role(Role.router)),
            *(str(network) for network in inv.cluster.admin_networks),
        ]
        for address in client_addresses:
            if tls:
                lines.append(f"hostssl all {TLS_SUPERUSER} {address} cert")
            lines.append(f"{tcp} all all {address} {password}")
        return lines

    def host_files(
        self, inv: Inventory, host: HostSpec, secrets: DbSecrets, extra_parameters: dict[str, str]
    ) -> list[ManagedFile]:
        self._check_secrets(secrets, inv)
        spec = self.cluster_spec(inv, extra_parameters)
        store = self._store_settings(inv)
        keeper_env = {
            **store,
            "UID": self.keeper_uid(host.name),
            "DATA_DIR": self.keeper_data_dir(inv),
            "PG_LISTEN_ADDRESS": str(host.address),
            "PG_PORT": str(inv.cluster.postgres.port),
            "PG_BIN_PATH": inv.cluster.postgres.bin_dir,
            "PG_SU_USERNAME": secrets.superuser,
            "PG_SU_PASSWORDFILE": self.su_password_path(inv),
            "PG_REPL_USERNAME": secrets.replication_user,
            "PG_REPL_PASSWORDFILE": self.repl_password_path(inv),
        }
        if inv.cluster.tls.enabled:
            keeper_env.update(self._tls_keeper_settings(inv, secrets))
        proxy_env = {**store, "LISTEN_ADDRESS": PROXY_LISTEN_ADDRESS, "PORT": str(inv.cluster.stolon.proxy_port)}
        return [
            self._secret_file(self.su_password_path(inv), secrets.superuser_password),
            self._secret_file(self.repl_password_path(inv), secrets.replication_password),
            ManagedFile(self.env_file_path(inv, "keeper"), _env_file("STKEEPER", keeper_env)),
            ManagedFile(self.env_file_path(inv, "sentinel"), _env_file("STSENTINEL", store)),
            ManagedFile(self.env_file_path(inv, "proxy"), _env_file("STPROXY", proxy_env)),
            ManagedFile(self.cluster_spec_path(inv), json.dumps(spec, indent=2, sort_keys=True) + "\n"),
            ManagedFile(self.unit_path(inv, "keeper"), self._keeper_unit(inv)),
            ManagedFile(self.unit_path(inv, "sentinel"), self._unit(inv, "sentinel", "stolon-sentinel")),
            ManagedFile(self.unit_path(inv, "proxy"), self._unit(inv, "proxy", "stolon-proxy")),
        ]

    def _tls_keeper_settings(self, inv: Inventory, secrets: DbSecrets) -> dict[str, str]:
        """The fork's keeper flags for TLS (cmd/keeper/cmd/keeper.go, v0.18.0 to v0.19.5)."""
        return {
            "PG_SU_CONNECTION_TYPE": "hostssl",
            "PG_REPL_CONNECTION_TYPE": "hostssl",
            "PG_SU_AUTH_METHOD": "cert",
            "PG_REPL_AUTH_METHOD": "cert",
            # Only pg_rewind's connection takes it; the keeper writes sslmode=prefer into
            # primary_conninfo and pg_basebackup's conninfo whatever the flags say. With
            # PGSSLROOTCERT set, libpq verifies the server's chain in prefer mode too, and a
            # failed handshake falls back to no TLS, which hostssl refuses.
            "PG_REPL_SSL_MODE": "verify-full",
            # One client certificate for every keeper connection (see the module docstring), and
            # the keeper's socket login as its replication user is `peer`: so the superuser. It has
            # REPLICATION; the keeper accepts the same name for both with the same auth method.
            "PG_REPL_USERNAME": secrets.superuser,
            "PG_REPL_PASSWORDFILE": self.su_password_path(inv),
        }

    @staticmethod
    def _check_secrets(secrets: DbSecrets, inv: Inventory | None = None) -> None:
        # Messages name the field, never the value.
        if inv is not None and inv.cluster.tls.enabled and secrets.superuser != TLS_SUPERUSER:
            raise HaSpecError(
                f"secrets.superuser: must be {TLS_SUPERUSER!r} while cluster.tls.enabled is true; the stolon keeper "
                f"then logs in over the socket with peer authentication, as the OS user {OS_USER}"
            )
        for field in ("superuser_password", "replication_password"):
            password = getattr(secrets, field)
            if not password:
                raise HaSpecError(f"secrets.{field}: empty; the keeper needs a password for md5 authentication")
            if "\n" in password or "\r" in password:
                raise HaSpecError(
                    f"secrets.{field}: contains a line break; the keeper strips trailing ones and one inside "
                    "would break primary_conninfo in postgresql.conf"
                )
            if password != password.strip():
                raise HaSpecError(
                    f"secrets.{field}: starts or ends with whitespace, almost always a copy mistake; refused so "
                    "that the password file, the keeper and the database role cannot disagree"
                )
        if secrets.superuser == secrets.replication_user and secrets.superuser_password != secrets.replication_password:
            raise HaSpecError(
                "secrets.replication_user: same as the superuser but with another password; stolon refuses that"
            )

    @staticmethod
    def _secret_file(path: str, password: str) -> ManagedFile:
        # The bare password, no trailing newline: the keeper would strip it and warn on every start.
        return ManagedFile(path, password, owner=OS_USER, group=OS_USER, mode=0o600, secret=True)

    def _store_settings(self, inv: Inventory) -> dict[str, str]:
        return {
            "CLUSTER_NAME": inv.cluster.name,
            "STORE_BACKEND": STORE_BACKEND,
            "STORE_ENDPOINTS": self.store_endpoints(inv),
            "STORE_PREFIX": inv.cluster.stolon.store_prefix,
            # <PREFIX>_STORE_CERT_FILE, _STORE_KEY, _STORE_CA_FILE (flagutil: upper case, '-' -> '_').
            **{flag.upper().replace("-", "_"): value for flag, value in self.store_tls_flags(inv).items()},
        }

    def _unit(self, inv: Inventory, component: str, binary: str, extra_service_lines: tuple[str, ...] = ()) -> str:
        cluster = inv.cluster.name
        return "\n".join([
            "# Managed by bouwsteen; local edits are overwritten.",
            "[Unit]",
            f"Description=stolon {component} of PostgreSQL cluster {cluster}",
            "Documentation=https://github.com/sorintlab/stolon",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"User={OS_USER}",
            f"Group={OS_USER}",
            f"EnvironmentFile={self.env_file_path(inv, component)}",
            *extra_service_lines,
            f"ExecStart={STOLON_BIN_DIR}/{binary}",
            "Restart=always",
            "RestartSec=5s",
            "LimitNOFILE=65536",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ])

    def _keeper_unit(self, inv: Inventory) -> str:
        data_dir = self.keeper_data_dir(inv)  # validate() vetted its characters
        environment: tuple[str, ...] = ()
        reload: tuple[str, ...] = ()
        if inv.cluster.tls.enabled:
            crt, key = pki.pg_client_pair(TLS_SUPERUSER)
            environment = (
                # libpq's defaults for every TCP connection the keeper and its postgres make (the
                # fork has no flag for them). No PGSSLMODE: the keeper writes sslmode into each
                # conninfo, which beats the environment. postgres_fdw and dblink refuse
                # non-superusers a connection that used no password, so no other role borrows the key.
                f"Environment=PGSSLCERT={crt}",
                f"Environment=PGSSLKEY={key}",
                f"Environment=PGSSLROOTCERT={pki.PG_CA}",
            )
            reload = (
                # The keeper handles only SIGINT and SIGTERM, so a SIGHUP would end it (Go's
                # default), and it never reloads PostgreSQL because a file changed. A reload is
                # PostgreSQL's alone: it rereads its certificate files. One that is not running (a
                # standby cloning) reads them when the keeper starts it, hence '-'.
                f"ExecReload=-{inv.cluster.postgres.bin_dir}/pg_ctl reload -D {self.pgdata(inv)}",
            )
        return self._unit(inv, "keeper", "stolon-keeper", (
            *environment,
            # '+' runs as root: postgres cannot create its own directory under /var/lib/stolon.
            f"ExecStartPre=+/usr/bin/install -d -o {OS_USER} -g {OS_USER} -m 0700 {data_dir}",
            *reload,
            # SIGTERM to the keeper alone makes it stop PostgreSQL cleanly; with the default
            # control-group mode postmaster and backends would get SIGTERM behind its back.
            # Whatever is left after the timeout is SIGKILLed, so no orphan postmaster survives.
            "KillMode=mixed",
            f"TimeoutStopSec={KEEPER_STOP_TIMEOUT_SECONDS}",
        ))

    def host_units(self, inv: Inventory, host: HostSpec) -> list[Unit]:
        keeper_inputs = (
            self.env_file_path(inv, "keeper"), self.unit_path(inv, "keeper"),
            self.su_password_path(inv), self.repl_password_path(inv),
        )
        # A new server pair or CA needs only PostgreSQL to reread it (the unit's ExecReload).
        # libpq's client pair (PGSSLCERT/PGSSLKEY) is read at each new connection: nothing to do.
        tls = pki.tls_paths() if inv.cluster.tls.enabled else ()
        # The etcd client pair and the CA are loaded once, when the component creates its store
        # client at start (internal/common/tls.go NewTLSConfig: tls.LoadX509KeyPair and RootCAs,
        # no reload hook), so every unit restarts when they change. The CA is in the keeper's
        # reload_on as well; a restart wins. A keeper restart stops and starts PostgreSQL, a proxy
        # restart drops the clients relayed through it: rotate_certificates applies the database
        # hosts one after another, so the keepers restart one at a time (build_cluster, which
        # ensures the database hosts' units in parallel, is not the way to roll certificates).
        store_tls = self.store_tls_paths(inv)
        # The spec file is not an input of any unit: only `stolonctl init` reads it.
        return [
            Unit(self.unit_name(inv, "keeper"), restart_on=(*keeper_inputs, *store_tls), reload_on=tls,
                 package="stolon"),
            Unit(self.unit_name(inv, "sentinel"),
                 restart_on=(self.env_file_path(inv, "sentinel"), self.unit_path(inv, "sentinel"), *store_tls),
                 package="stolon"),
            Unit(self.unit_name(inv, "proxy"),
                 restart_on=(self.env_file_path(inv, "proxy"), self.unit_path(inv, "proxy"), *store_tls),
                 package="stolon"),
        ]

    # -------------------------------------------------------------- commands

    def stolonctl_argv(self, inv: Inventory, *subcommand: str) -> list[str]:
        """stolonctl with every root flag explicit (it reads only root flags from env anyway).

        Runs as the session's user, root (directly or through sudo): it can read the postgres-owned
        etcd client key that the TLS flags name."""
        return [
            STOLONCTL,
            "--cluster-name", inv.cluster.name,
            "--store-backend", STORE_BACKEND,
            "--store-endpoints", self.store_endpoints(inv),
            "--store-prefix", inv.cluster.stolon.store_prefix,
            *(item for flag, value in self.store_tls_flags(inv).items() for item in (f"--{flag}", value)),
            *subcommand,
        ]

    def bootstrap_commands(self, inv: Inventory, secrets: DbSecrets, extra_parameters: dict[str, str]) -> list[Command]:
        """`stolonctl init -y -f <spec file>` (host_files wrote the file), behind two guards.

        `init -y` overwrites existing clusterdata with a new cluster uid, after which keepers
        throw their data away; so the script refuses when clusterdata exists or the store cannot
        be read, and (for initMode new) when this host already has a PGDATA from an earlier
        cluster, as the building block's `PG_VERSION` check does.
        """
        self._check_secrets(secrets, inv)
        spec = self.cluster_spec(inv, extra_parameters)
        guard_pgdata = "yes" if spec.get("initMode") == "new" else "no"
        text = (
            'pgdata=$1 spec=$2 guard_pgdata=$3\n'
            'shift 3\n'
            'if [ "$guard_pgdata" = yes ] && [ -e "$pgdata/PG_VERSION" ]; then\n'
            '  echo "refusing stolonctl init: $pgdata/PG_VERSION exists (data of an earlier cluster; initialise with initMode existing)" >&2\n'
            '  exit 3\n'
            'fi\n'
            'if probe=$("$@" clusterdata read 2>&1 >/dev/null); then\n'
            '  echo "refusing stolonctl init: clusterdata already exists, the cluster is initialised" >&2\n'
            '  exit 3\n'
            'fi\n'
            'case $probe in\n'
            f'  *"{NIL_CLUSTER_DATA}"*) ;;\n'
            '  *) printf "refusing stolonctl init: cannot tell whether the cluster exists: %s\\n" "$probe" >&2; exit 1 ;;\n'
            'esac\n'
            'exec "$@" init -y -f "$spec"\n'
        )
        return [script(
            text,
            timeout=INIT_TIMEOUT,
            args=[self.pgdata(inv), self.cluster_spec_path(inv), guard_pgdata, *self.stolonctl_argv(inv)],
            description=f"stolonctl init -y -f {self.cluster_spec_path(inv)} (cluster {inv.cluster.name})",
        )]

    def restore_stopped_units(self, inv: Inventory, host: HostSpec) -> list[str]:
        # The sentinel must stay up to drive the pitr init; the proxies route nowhere while no
        # keeper is master.
        return [self.unit_name(inv, "keeper")]

    def pitr_init_commands(self, inv: Inventory, data_restore_command: str, wal_restore_command: str,
                           target_time: datetime | None) -> list[Command]:
        """`stolonctl init -y` with the spec bootstrap_commands initialises with (the file
        host_files wrote) plus `initMode: pitr`. The sentinel hands the init to a registered keeper
        picked at random, so every member must be able to run the restore commands; the others
        resync from it. Neither the sentinel nor (with syncTimeout unset) the keeper gives up on a
        pitr init, and the keeper retries a failed restore: whoever waits needs its own deadline.

        The spec is read on the host because its pgParameters carry the backup driver's archive
        settings, which this method is not given: without them the restored cluster would not
        archive. It holds no secret, so it travels as an argument, as in upstream's doc/pitr.md."""
        self.validate(inv)
        config = _pitr_config(data_restore_command, wal_restore_command, target_time)
        target = config.get("recoveryTargetSettings", {}).get("recoveryTargetTime")
        document = json.dumps({"initMode": "pitr", "pitrConfig": config}, sort_keys=True, separators=(",", ":"))
        return [cmd(
            "python3", "-c", _PITR_INIT, self.cluster_spec_path(inv), document, *self.stolonctl_argv(inv),
            timeout=INIT_TIMEOUT,
            description=f"stolonctl init -y (cluster {inv.cluster.name}: {self.cluster_spec_path(inv)} with initMode "
                        f"pitr, to {target or 'the end of the archive'})",
        )]

    def status_commands(self, inv: Inventory) -> list[Command]:
        # --format is a subcommand flag: env cannot set it.
        return [
            cmd(*self.stolonctl_argv(inv, "status", "--format", "json"), timeout=STATUS_TIMEOUT,
                description=f"stolonctl status --format json (cluster {inv.cluster.name})"),
            cmd(*self.stolonctl_argv(inv, "clusterdata", "read"), timeout=STATUS_TIMEOUT,
                description=f"stolonctl clusterdata read (cluster {inv.cluster.name})"),
        ]

    def switchover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        """`failkeeper <master keeper>`: stolon cannot target a standby, so `candidate` is advisory;
        the sentinel elects the best healthy, converged standby and the flow verifies who won.

        With asynchronous replication the old master may have commits its successor never got;
        stolon's lossless recipe is: enable synchronousReplication (settings_commands), wait for
        sync_state = 'sync', switch over, then restore the setting.
        """
        master_uid = self._master_keeper_uid(view, "switch over")
        if candidate == view.leader:
            raise HaSpecError(f"candidate: {candidate!r} is already the primary")
        if view.member(candidate) is None:
            known = ", ".join(m.name for m in view.members) or "none"
            raise HaSpecError(f"candidate: {candidate!r} is not a member of cluster {inv.cluster.name!r} (members: {known})")
        return [self._failkeeper(inv, master_uid)]

    def failover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        """Fail the lost master's keeper at once instead of waiting failInterval. Without a
        registered master keeper there is nothing to fail: the sentinel elects on its own."""
        master_uid = view.handles.get("master_keeper_uid", "")
        registered = {self.keeper_uid(member.name) for member in view.members}
        if not master_uid or master_uid not in registered:
            return []
        return [self._failkeeper(inv, master_uid)]

    def _failkeeper(self, inv: Inventory, keeper_uid: str) -> Command:
        return cmd(*self.stolonctl_argv(inv, "failkeeper", keeper_uid), timeout=FAILKEEPER_TIMEOUT,
                   description=f"stolonctl failkeeper {keeper_uid} (cluster {inv.cluster.name})")

    @staticmethod
    def _master_keeper_uid(view: ClusterView, action: str) -> str:
        if not view.initialized:
            raise HaStatusError(f"cannot {action}: the stolon cluster is not initialised")
        master_uid = view.handles.get("master_keeper_uid", "")
        if not master_uid:
            raise HaStatusError(f"cannot {action}: stolon reports no master keeper")
        return master_uid

    def settings_commands(self, inv: Inventory, settings: HaSettings) -> list[Command]:
        patch: dict[str, Any] = {}
        if settings.synchronous_replication is not None:
            patch["synchronousReplication"] = settings.synchronous_replication
        if settings.postgres_parameters:
            patch["pgParameters"] = dict(settings.postgres_parameters)
        if not patch:
            return []
        problems: list[str] = []
        _check_against_schema(patch, CLUSTER_SPEC_SCHEMA, "settings", problems)
        problems += _managed_parameter_problems(settings.postgres_parameters, "settings.postgres_parameters")
        if inv.cluster.tls.enabled:
            # settings_drift hands on the TLS parameters themselves; anything else would undo TLS.
            problems += [
                f"settings.postgres_parameters.{name}: {value!r} while cluster.tls.enabled is true needs "
                f"{TLS_PG_PARAMETERS[str(name).lower()]!r}"
                for name, value in settings.postgres_parameters.items()
                if str(name).lower() in TLS_PG_PARAMETERS
                and _normalised_setting(value) != _normalised_setting(TLS_PG_PARAMETERS[str(name).lower()])
            ]
        if problems:
            raise HaSpecError("\n".join(problems))
        return [self._update_patch(inv, patch)]

    def spec_update_commands(self, inv: Inventory, extra_parameters: Mapping[str, str]) -> list[Command]:
        """Bring a running cluster's spec in line with the rendered spec (pgHBA after adding a
        host, pgParameters, timings). Init-only fields are left out: stolon refuses to change
        initMode or role, and the *Config blocks only matter at init.

        `update --patch` replaces lists whole, so pgHBA goes in complete: the running spec then
        holds exactly the rendered lines (a removed host's line goes too). Maps merge, so a
        parameter merely dropped from the inventory stays set; an explicit `null` in
        cluster.stolon.cluster_spec (a field, or a pgParameters entry) is passed on as `null`,
        which removes it from the running spec as it was left out of the rendered one."""
        spec = self.cluster_spec(inv, extra_parameters)
        init_only = {"initMode", "role", "newConfig", "pitrConfig", "existingConfig"}
        patch: dict[str, Any] = {k: v for k, v in spec.items() if k not in init_only}
        overrides = inv.cluster.stolon.cluster_spec
        for field, value in overrides.items():
            if value is None and field not in init_only:
                patch[field] = None
        removed_parameters = [
            name for name, value in (overrides.get("pgParameters") or {}).items()
            if value is None and name not in (spec.get("pgParameters") or {})
        ]
        if removed_parameters and isinstance(patch.get("pgParameters"), Mapping):
            patch["pgParameters"] = {**patch["pgParameters"], **dict.fromkeys(removed_parameters)}
        return [self._update_patch(inv, patch)]

    def restart_commands(self, inv: Inventory, host: str) -> list[Command]:
        # The keeper starts PostgreSQL with the spec's current pgParameters, and SIGTERM makes it
        # stop PostgreSQL cleanly first (the unit's KillMode=mixed). A standby only: the sentinel
        # fails a master whose keeper is gone longer than failInterval.
        unit = self.unit_name(inv, "keeper")
        return [cmd("systemctl", "restart", unit, timeout=180,
                    description=f"stolon keeper {self.keeper_uid(host)} restarted ({unit})")]

    def managed_parameters(self, inv: Inventory, extra_parameters: dict[str, str]) -> dict[str, str | None]:
        spec = self.cluster_spec(inv, extra_parameters)
        parameters = {str(k).lower(): str(v) for k, v in (spec.get("pgParameters") or {}).items() if v is not None}
        return {**parameters, **dict.fromkeys(STOLON_MANAGED_PG_PARAMETERS)}

    def _update_patch(self, inv: Inventory, patch: Mapping[str, Any]) -> Command:
        # The patch holds no secrets, so it travels as an argument instead of a temporary file.
        document = json.dumps(patch, sort_keys=True, separators=(",", ":"))
        return cmd(*self.stolonctl_argv(inv, "update", "--patch", document), timeout=UPDATE_TIMEOUT,
                   description=f"stolonctl update --patch (cluster {inv.cluster.name}: {', '.join(sorted(patch))})")

    def listeners(self, inv: Inventory) -> dict[int, frozenset[str]]:
        return {inv.cluster.stolon.proxy_port: frozenset({"stolon-keeper", "stolon-proxy", "postgres"})}

    def config_paths(self, inv: Inventory) -> list[str]:
        return [self.cluster_spec_path(inv), self.env_file_path(inv, "keeper")]

    def socket_dir(self, inv: Inventory) -> str:
        return "/tmp"  # the keeper always sets unix_socket_directories

    def socket_needs_password(self, inv: Inventory) -> bool:
        # The keeper's generateHBA: `local postgres <superuser> md5`, or with TLS on (auth method
        # cert, which the fork turns into peer on the socket) `local postgres postgres peer`.
        return not inv.cluster.tls.enabled

    def rw_port(self, inv: Inventory) -> int:
        # stolon-proxy forwards to the master wherever it is, and cuts clients off when it moves.
        return inv.cluster.stolon.proxy_port

    def membership_commands(self, inv: Inventory, extra_parameters: dict[str, str]) -> list[Command]:
        # The keepers take pg_hba from the cluster spec's pgHBA, which names every database host.
        return self.spec_update_commands(inv, extra_parameters)

    # -------------------------------------------------------------- settings drift

    def show_config_command(self, inv: Inventory) -> Command:
        """The running cluster spec (unset fields omitted: stolon then uses its defaults)."""
        return cmd(*self.stolonctl_argv(inv, "spec"), timeout=STATUS_TIMEOUT,
                   description=f"stolonctl spec (cluster {inv.cluster.name})")

    def parse_config(self, result: CommandResult) -> dict[str, Any]:
        if result.exit_code != 0:
            raise HaStatusError(f"`stolonctl spec` exited {result.exit_code}: {_first_line(result.stderr or result.stdout)}")
        document, problem = _load_json(result.stdout)
        if problem:
            raise HaStatusError(f"`stolonctl spec`: {problem}")
        # Every stored spec has initMode; anything else (e.g. `{}`) is not a spec.
        if not isinstance(document, dict) or "initMode" not in document:
            raise HaStatusError("`stolonctl spec`: no cluster spec in the output")
        return document

    def settings_drift(self, inv: Inventory, current: Mapping[str, Any], extra_parameters: Mapping[str, str]) -> HaSettings:
        """What settings_commands must change so the running spec matches the inventory (empty =
        nothing to do). A parameter dropped from the inventory is not reported: a patch cannot
        express removal through HaSettings; spec_update_commands does not remove it either."""
        wanted = self.cluster_spec(inv, extra_parameters)
        current_parameters = current.get("pgParameters") or {}
        changed = {
            name: value
            for name, value in (wanted.get("pgParameters") or {}).items()
            if _normalised_setting(current_parameters.get(name)) != _normalised_setting(value)
        }
        wanted_sync = bool(wanted.get("synchronousReplication", False))
        sync = wanted_sync if bool(current.get("synchronousReplication", False)) != wanted_sync else None
        return HaSettings(synchronous_replication=sync, postgres_parameters=changed)

    def reinit_commands(self, inv: Inventory, view: ClusterView, host: str) -> list[Command]:
        """Upstream's recipe for a broken keeper: stop it, `removekeeper` (the sentinel forgets its
        db), and start it on an empty data directory; the sentinel then gives the keeper a new db
        to resync from the master. The keeper's own state file (its uid and cluster uid) stays;
        a keeper with the same uid but another data directory is what upstream warns against."""
        uid = self.keeper_uid(host)
        keeper = self.unit_name(inv, "keeper")
        removekeeper = self.stolonctl_argv(inv, "removekeeper", uid)
        text = (
            'keeper=$1 data=$2\n'
            'shift 2\n'
            'systemctl stop "$keeper"\n'
            '"$@"\n'
            'rm -rf -- "$data/postgres" "$data/dbstate"\n'
            'systemctl start "$keeper"\n'
        )
        return [script(text, args=(keeper, self.keeper_data_dir(inv), *removekeeper), timeout=180,
                       description=f"stolon keeper {uid} re-cloned (removekeeper, data removed)")]

    def member_data_paths(self, inv: Inventory) -> list[str]:
        # The keeper's state file names its uid and the cluster uid next to PGDATA: a keeper added
        # again must start as a new one, as upstream asks of a changed data directory.
        return [self.keeper_data_dir(inv)]

    def member_removed_commands(self, inv: Inventory, host: str) -> list[Command]:
        # removekeeper drops the keeper and its db from clusterdata; the master's keeper then drops
        # the db's slot itself. It refuses the master, which pre-flight already refused.
        uid = self.keeper_uid(host)
        return [cmd(*self.stolonctl_argv(inv, "removekeeper", uid), timeout=FAILKEEPER_TIMEOUT,
                    description=f"stolonctl removekeeper {uid} (cluster {inv.cluster.name})")]

    # -------------------------------------------------------------- status

    def parse_status(self, inv: Inventory, results: list[CommandResult]) -> ClusterView:
        if len(results) != 2:
            raise HaStatusError(f"expected the results of `status --format json` and `clusterdata read`, got {len(results)}")
        status_result, clusterdata_result = results
        status, status_problem = _read_status_json(status_result)
        clusterdata, clusterdata_problem = _read_clusterdata_json(clusterdata_result)

        if status_problem or clusterdata_problem:
            if _never_initialised(status_result, clusterdata_result):
                return ClusterView(initialized=False)
            problems = [p for p in (status_problem, clusterdata_problem) if p]
            raise HaStatusError(f"stolon cluster {inv.cluster.name!r}: " + "; ".join(problems))
        if status is None or clusterdata is None:  # unreachable: a missing document comes with a problem
            raise HaStatusError(f"stolon cluster {inv.cluster.name!r}: no status read")
        return self._view(inv, status, clusterdata)

    def _view(self, inv: Inventory, status: Mapping[str, Any], clusterdata: Mapping[str, Any]) -> ClusterView:
        cluster = clusterdata["cluster"]
        dbs = clusterdata.get("dbs") or {}
        if not isinstance(dbs, Mapping):
            raise HaStatusError("clusterdata: 'dbs' is not an object")
        master_db_uid = str((cluster.get("status") or {}).get("master") or "")
        master_keeper_uid = ""
        if master_db_uid:
            master_db = dbs.get(master_db_uid)
            if not isinstance(master_db, Mapping):
                raise HaStatusError(f"clusterdata: master db {master_db_uid!r} is not among the dbs")
            master_keeper_uid = str((master_db.get("spec") or {}).get("keeperUID") or "")
            if not master_keeper_uid:
                raise HaStatusError(f"clusterdata: master db {master_db_uid!r} has no keeperUID")

        status_cluster = status["cluster"]
        reported_keeper = status_cluster.get("master_keeper_uid", "")
        reported_db = status_cluster.get("master_db_uid", "")
        # Two separate reads: a failover between them makes them disagree. Never guess.
        if reported_keeper != master_keeper_uid or (reported_db and reported_db != master_db_uid):
            raise HaStatusError(
                f"stolon status says master keeper {reported_keeper or '(none)'!r} (db {reported_db or '(none)'}) but "
                f"clusterdata says {master_keeper_uid or '(none)'!r} (db {master_db_uid or '(none)'}); "
                "a failover may be in progress, read the status again"
            )

        db_by_keeper: dict[str, Mapping[str, Any]] = {}
        for db_uid, db in dbs.items():
            if isinstance(db, Mapping):
                keeper_uid = (db.get("spec") or {}).get("keeperUID")
                if keeper_uid:
                    db_by_keeper[str(keeper_uid)] = {**db, "uid": db_uid}
        master_xlog = _xlog_pos(dbs.get(master_db_uid)) if master_db_uid else None
        # The sentinel only elects a new master among the dbs the master reports as synchronous.
        master_status = ((dbs.get(master_db_uid) or {}).get("status") or {}) if master_db_uid else {}
        synchronous_dbs = {str(uid) for uid in master_status.get("synchronousStandbys") or []}

        host_by_keeper = self._keeper_to_host(inv)
        members: list[Member] = []
        for entry in status["keepers"]:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("uid"), str):
                raise HaStatusError(f"stolon status: malformed keeper entry {entry!r}")
            uid = entry["uid"]
            db = db_by_keeper.get(uid)
            member = self._member(inv, uid, entry, db, uid == master_keeper_uid, master_xlog, host_by_keeper)
            if db is not None and member.role == "replica" and db["uid"] in synchronous_dbs:
                member = replace(member, synchronous=True)
            members.append(member)

        leader = host_by_keeper.get(master_keeper_uid, master_keeper_uid) if master_keeper_uid else None
        leader_sentinel = next(
            (s.get("uid", "") for s in status.get("sentinels") or [] if isinstance(s, Mapping) and s.get("leader")), ""
        )
        handles = {
            "master_keeper_uid": master_keeper_uid,
            "master_db_uid": master_db_uid,
            "cluster_uid": str(cluster.get("uid") or ""),
            "phase": str((cluster.get("status") or {}).get("phase") or ""),
            "available": "true" if status_cluster.get("available") else "false",
            "leader_sentinel_uid": str(leader_sentinel),
        }
        return ClusterView(
            initialized=True, members=tuple(sorted(members, key=lambda m: m.name)), leader=leader, handles=handles
        )

    def _member(
        self,
        inv: Inventory,
        uid: str,
        entry: Mapping[str, Any],
        db: Mapping[str, Any] | None,
        is_master: bool,
        master_xlog: int | None,
        host_by_keeper: Mapping[str, str],
    ) -> Member:
        # A keeper the inventory does not know keeps its uid as name, so flows notice it.
        name = host_by_keeper.get(uid, uid)
        db_status = (db or {}).get("status") or {}
        db_role = ((db or {}).get("spec") or {}).get("role", "")

        address = _address_from_listen(str(entry.get("listen_address") or ""))
        if not address and db_status.get("listenAddress"):
            address = str(db_status["listenAddress"])
        if not address:
            host = inv.find(name)
            address = str(host.address) if host else ""

        keeper_healthy = entry.get("healthy") is True
        pg_healthy = entry.get("pg_healthy") is True
        notes: list[str] = []
        role: Literal["primary", "replica", "unknown"]
        if db is None:
            role = "unknown"
            notes.append("no db assigned")
        elif is_master:
            role = "primary"
            notes.append("master")
        elif db_role == "standby":
            role = "replica"
            notes.append("standby")
        else:
            # Not the cluster master yet wanted as master: mid-failover leftovers.
            role = "unknown"
            notes.append(str(db_role or "unknown role"))
        if not keeper_healthy:
            notes.append("keeper unhealthy")
        if db is not None and not pg_healthy:
            notes.append("postgres unhealthy")
        if entry.get("pg_wanted_generation") != entry.get("pg_current_generation"):
            notes.append("converging")

        xlog = _xlog_pos(db)
        lag = 0 if role == "primary" else None  # as the patroni driver reports its leader
        if role == "replica" and xlog is not None and master_xlog is not None:
            # Positions are sampled at different moments; a standby can look slightly ahead.
            lag = max(0, master_xlog - xlog)
        timeline = db_status.get("timelineID")
        return Member(
            name=name,
            address=address,
            role=role,
            healthy=keeper_healthy and pg_healthy,
            state=", ".join(notes),
            timeline=timeline if isinstance(timeline, int) and not isinstance(timeline, bool) and timeline > 0 else None,
            lag_bytes=lag,
        )


# ------------------------------------------------------------------ pitr


def _pitr_config(data_restore_command: str, wal_restore_command: str, target_time: datetime | None) -> dict[str, Any]:
    """pitrConfig (internal/cluster/cluster.go PITRConfig); HaSpecError naming the argument."""
    problems: list[str] = []
    if not data_restore_command.strip() or "\n" in data_restore_command or "\r" in data_restore_command:
        problems.append("data_restore_command: must be one non-empty line")
    elif "%d" not in data_restore_command:
        problems.append("data_restore_command: has no %d, where the keeper puts the data directory to restore into")
    if not wal_restore_command.strip() or "\n" in wal_restore_command or "\r" in wal_restore_command:
        problems.append("wal_restore_command: must be one non-empty line")
    elif "%f" not in wal_restore_command or "%p" not in wal_restore_command:
        problems.append("wal_restore_command: needs %f and %p, the WAL file PostgreSQL asks for and where it goes")
    if "'" in wal_restore_command:
        # The keeper writes recovery settings as name = '<value>' without doubling quotes.
        problems.append("wal_restore_command: holds a single quote, which would end the restore_command setting "
                        "the keeper writes")
    if target_time is not None and target_time.utcoffset() is None:
        problems.append("target_time: has no time zone; PostgreSQL would read it in the server's")
    if problems:
        raise HaSpecError("\n".join(problems))
    pitr: dict[str, Any] = {
        "dataRestoreCommand": data_restore_command,
        "archiveRecoverySettings": {"restoreCommand": wal_restore_command},
    }
    if target_time is not None:
        # PostgreSQL reads recovery_target_time as a timestamptz; an explicit UTC offset leaves
        # nothing to the server's time zone.
        pitr["recoveryTargetSettings"] = {
            "recoveryTargetTime": target_time.astimezone(timezone.utc).isoformat(sep=" "),
        }
    return pitr


# ------------------------------------------------------------------ parsing helpers


def _load_json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc.msg} at line {exc.lineno}): {_first_line(text)[:80]!r}"


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "(no output)"


def _read_status_json(result: CommandResult) -> tuple[dict[str, Any] | None, str | None]:
    what = "`stolonctl status --format json`"
    if result.exit_code != 0:
        return None, f"{what} exited {result.exit_code}: {_first_line(result.stderr or result.stdout)}"
    document, problem = _load_json(result.stdout)
    if problem:
        return None, f"{what}: {problem}"
    if not isinstance(document, dict):
        return None, f"{what}: expected an object, got {type(document).__name__}"
    if "cluster" not in document:
        # stolonctl's JSON mode prints `{}` and exits 0 on any error (store down, no clusterdata).
        detail = f"; stderr: {_first_line(result.stderr)}" if result.stderr.strip() else ""
        return None, f"{what} printed {'{}' if not document else 'no cluster section'} (stolonctl's way of failing){detail}"
    if not isinstance(document["cluster"], dict) or not isinstance(document.get("keepers", []), list):
        return None, f"{what}: unexpected shape (cluster must be an object, keepers a list)"
    document.setdefault("keepers", [])
    return document, None


def _read_clusterdata_json(result: CommandResult) -> tuple[dict[str, Any] | None, str | None]:
    what = "`stolonctl clusterdata read`"
    if result.exit_code != 0:
        return None, f"{what} exited {result.exit_code}: {_first_line(result.stderr or result.stdout)}"
    document, problem = _load_json(result.stdout)
    if problem:
        return None, f"{what}: {problem}"
    if not isinstance(document, dict) or not isinstance(document.get("cluster"), dict):
        return None, f"{what}: no cluster object"
    if document.get("formatVersion") != 1:
        return None, f"{what}: unsupported clusterdata formatVersion {document.get('formatVersion')!r} (expected 1)"
    return document, None


def _never_initialised(status_result: CommandResult, clusterdata_result: CommandResult) -> bool:
    """True only when both reads agree the clusterdata key is absent (store reachable, no init)."""
    clusterdata_says_nil = clusterdata_result.exit_code != 0 and NIL_CLUSTER_DATA in clusterdata_result.stderr
    status_text = status_result.stdout.strip()
    status_agrees = (status_result.exit_code == 0 and status_text == "{}") or (
        status_result.exit_code != 0 and NIL_CLUSTER_DATA in status_result.stderr
    )
    return clusterdata_says_nil and status_agrees


_BOOLEAN_SPELLINGS = {
    "on": "on", "true": "on", "yes": "on", "1": "on",
    "off": "off", "false": "off", "no": "off", "0": "off",
}


def _normalised_setting(value: Any) -> str | None:
    # `stolonctl spec` prints pgParameters exactly as stored (after init: as pg_file_settings
    # read them back), so values compare verbatim. Only boolean spellings, which PostgreSQL reads
    # alike in any case, are folded; other values keep their case (commands, paths, prefixes).
    if value is None:
        return None
    text = str(value).strip()
    return _BOOLEAN_SPELLINGS.get(text.lower(), text)


def _xlog_pos(db: Any) -> int | None:
    if not isinstance(db, Mapping):
        return None
    value = (db.get("status") or {}).get("xLogPos")
    # Go omits zero values, and 0 would be a meaningless position anyway.
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _address_from_listen(listen_address: str) -> str:
    """'10.0.0.5:5432' -> '10.0.0.5'; stolon's placeholders '(no db assigned)'/'(unknown)' -> ''."""
    if not listen_address or listen_address.startswith("("):
        return ""
    host, separator, port = listen_address.rpartition(":")
    return host if separator and port.isdigit() else listen_address


def _env_file(prefix: str, values: Mapping[str, str]) -> str:
    lines = [f"# Managed by bouwsteen; local edits are overwritten. {prefix}_<FLAG> = --<flag> of the binary."]
    for key, value in values.items():
        if not _ENV_SAFE_VALUE.match(value):
            raise HaSpecError(f"{prefix}_{key}: value {value!r} has characters an EnvironmentFile cannot carry unquoted")
        lines.append(f"{prefix}_{key}={value}")
    return "\n".join(lines) + "\n"
