"""Patroni (3.0.3 or later; the lab runs 4.0.7 over Debian's package) as the HA driver: the one the lab runs."""

from __future__ import annotations

import json
import re
import shlex

import yaml

from blocks.inventory import HostSpec, Inventory, Role
from tasks.adapters import etcd_config, haproxy, pki
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

CONFIG_PATH = "/etc/patroni/config.yml"
PGPASS_PATH = "/var/lib/postgresql/.pgpass_patroni"
REST_USER = "patroni"
# HAProxy's client pair for its health checks of the REST API (one PEM: certificate, then key).
REST_CHECK_PEM = "/etc/haproxy/bouwsteen-check.pem"
REST_CHECK_CLIENT = "haproxy-check"

# Parameters that need a restart: set once at bootstrap so later runs never restart PostgreSQL.
BASE_PARAMETERS = {
    "wal_level": "replica",
    "hot_standby": "on",
    "wal_log_hints": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    # A standby cut off for a while (a partition, a reboot) catches up from the primary's pg_wal.
    "wal_keep_size": "1GB",
    "password_encryption": "scram-sha-256",
    "unix_socket_directories": "/var/run/postgresql",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "shared_preload_libraries": "pg_stat_statements",
}

# Set by Patroni itself on every start (postgresql/config.py, CMDLINE_OPTIONS and the recovery
# parameters): a value in the dynamic configuration would be ignored or fight Patroni.
PATRONI_OWNED_PARAMETERS = ("listen_addresses", "port", "cluster_name", "data_directory", "config_file",
                            "hba_file", "ident_file", "primary_conninfo", "primary_slot_name", "restore_command",
                            "recovery_target", "recovery_target_lsn", "recovery_target_name",
                            "recovery_target_time", "recovery_target_xid", "recovery_target_timeline",
                            "recovery_target_action", "recovery_target_inclusive")

# Patroni's health JSON (json.dumps) says "role": "primary" once PostgreSQL is out of recovery.
PRIMARY_ROLE_BODY = "'\"role\": *\"primary\"'"
# ... and "state": "running" while PostgreSQL runs ("stopping" from the moment Patroni stops it).
RUNNING_STATE_BODY = "'\"state\": *\"running\"'"

_ROLE = {
    "leader": "primary",
    "standby leader": "primary",
    "replica": "replica",
    "sync standby": "replica",
    "quorum standby": "replica",
}


def patronictl(*args: str, timeout: float = 30) -> Command:
    return cmd("patronictl", "-c", CONFIG_PATH, *args, timeout=timeout, user="postgres")


def _until_success(success: str, *args: str, timeout: float, description: str) -> Command:
    """patronictl as postgres, where only its success line counts: it exits 0 after the REST
    API's "Failed: ..." answer too, and after a `--wait` that ran out."""
    argv = patronictl(*args, timeout=timeout).argv
    text = ('out=$("$@" 2>&1); status=$?\n'
            'printf "%s\\n" "$out"\n'
            f'case $out in *"{success}"*) exit "$status" ;; esac\n'
            'exit 1\n')
    return script(text, args=argv, user="postgres", timeout=timeout, description=description)


def _drained(tags: object) -> bool:
    # patronictl lists only the tags a member has set (false ones are left out).
    return isinstance(tags, dict) and bool(tags.get("nofailover")) and bool(tags.get("nosync"))


class PatroniDriver(HaDriver):
    name = "patroni"
    has_maintenance_mode = True
    can_drain = True
    # Patroni starts from this copy of the dynamic configuration when etcd holds none.
    cached_state_files = ("patroni.dynamic.json",)

    def packages(self, inv: Inventory) -> list[str]:
        # openssl: tls_reloaded_commands asks the REST API which certificate it presents.
        tls = ["openssl"] if inv.cluster.tls.enabled else []
        return [inv.cluster.postgres.package, "postgresql-contrib", "patroni", "haproxy", *tls]

    def release_floors(self) -> list[tuple[str, str, str]]:
        # Seen in the lab with Debian 12's 3.0.2: a primary cut off from etcd took longer to demote
        # than the partition lasted; when its demotion finished it wrote its own leader key over its
        # successor's and promoted itself again, leaving two timeline 2s and the successor's
        # writes gone. 3.0.3 only updates the leader key while it is still its own (patroni#2689).
        return [("patroni", "3.0.3", "an older Patroni overwrites its successor's leader key when a partitioned "
                 "primary's demotion ends after the network is back, and promotes itself again (lost writes; "
                 "fixed in 3.0.3, patroni/patroni#2689)")]

    def validate(self, inv: Inventory) -> None:
        params = self.dynamic_configuration(inv, {})["postgresql"]["parameters"]
        for reserved in ("listen_addresses", "port", "data_directory", "hba_file", "primary_conninfo"):
            if reserved in inv.cluster.postgres.parameters:
                raise HaSpecError(
                    f"cluster.postgres.parameters.{reserved}: managed by Patroni from the inventory; remove it"
                )
        if params.get("synchronous_commit") == "off" and inv.cluster.postgres.synchronous_replication:
            raise HaSpecError("cluster.postgres.parameters.synchronous_commit: 'off' defeats synchronous_replication")

    def etcd_prefix(self, inv: Inventory) -> str:
        return f"{inv.cluster.etcd.prefix}/patroni/{inv.cluster.name}/"

    # ------------------------------------------------------------------ files

    def dynamic_configuration(self, inv: Inventory, extra_parameters: dict[str, str]) -> dict:
        """The DCS-wide settings (patronictl show-config / edit-config)."""
        spec = inv.cluster.patroni
        parameters = {**BASE_PARAMETERS, **extra_parameters, **inv.cluster.postgres.parameters}
        return {
            "ttl": spec.ttl,
            "loop_wait": spec.loop_wait,
            "retry_timeout": spec.retry_timeout,
            "maximum_lag_on_failover": spec.maximum_lag_on_failover,
            "synchronous_mode": inv.cluster.postgres.synchronous_replication,
            "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": parameters},
        }

    def pg_hba(self, inv: Inventory, secrets: DbSecrets) -> list[str]:
        """Scoped to the cluster's own addresses: nothing else may even try to log in. With TLS on,
        TCP lines are `hostssl` only, and the superuser and replication roles log in with their
        client certificate (`cert`: verified, common name = role), never a password."""
        db = inv.db_hosts
        routers = inv.with_role(Role.router)
        restore = inv.with_role(Role.restore)
        app_db = inv.cluster.postgres.application_database
        tls = inv.cluster.tls.enabled
        tcp = "hostssl" if tls else "host"
        strong = "cert" if tls else "scram-sha-256"
        scram = "scram-sha-256"
        lines = [
            "local all postgres peer",
            "local replication postgres peer",
            # Patroni asks its own PostgreSQL for timeline and LSN over a replication connection to
            # localhost when it races for leadership; without this line no node can win a failover.
            f"{tcp} replication {secrets.replication_user} 127.0.0.1/32 {strong}",
        ]
        for host in db:
            lines.append(f"{tcp} replication {secrets.replication_user} {host.address}/32 {strong}")
            # pg_rewind and pgBackRest's backup-from-standby connect as the superuser from peers.
            lines.append(f"{tcp} all {secrets.superuser} {host.address}/32 {strong}")
            lines.append(f"{tcp} {app_db} all {host.address}/32 {scram}")
        for host in restore:
            lines.append(f"{tcp} all {secrets.superuser} {host.address}/32 {strong}")
        for net in inv.cluster.admin_networks:
            lines.append(f"{tcp} all {secrets.superuser} {net} {strong}")
            lines.append(f"{tcp} {app_db} all {net} {scram}")
            lines.append(f"{tcp} postgres all {net} {scram}")
        # A router relays the application's clients and runs the primary detector: those two roles
        # only, so the superuser is never reachable through the VIP.
        for host in routers:
            lines.append(f"{tcp} {app_db} {secrets.application_user} {host.address}/32 {scram}")
            lines.append(f"{tcp} postgres {secrets.monitor_user} {host.address}/32 {scram}")
        return lines

    def _authentication(self, inv: Inventory, secrets: DbSecrets) -> dict:
        roles = {"superuser": (secrets.superuser, secrets.superuser_password),
                 "replication": (secrets.replication_user, secrets.replication_password)}
        auth = {}
        for kind, (user, password) in roles.items():
            entry = {"username": user, "password": password}
            if inv.cluster.tls.enabled:
                crt, key = pki.pg_client_pair(user)
                entry.update(sslmode="verify-full", sslrootcert=pki.PG_CA, sslcert=crt, sslkey=key)
            auth[kind] = entry
        return auth

    def _etcd(self, inv: Inventory, hosts: list[str]) -> dict:
        if not inv.cluster.tls.enabled:
            return {"hosts": hosts, "protocol": "http"}
        crt, key = pki.pg_client_pair(pki.ETCD_CLIENT)
        return {"hosts": hosts, "protocol": "https", "cacert": pki.PG_CA, "cert": crt, "key": key}

    def _local_parameters(self, inv: Inventory) -> dict:
        parameters = {"unix_socket_directories": "/var/run/postgresql"}
        if inv.cluster.tls.enabled:
            # Local (not DCS-wide) settings: the paths are the same everywhere, but a member
            # without its certificate must not be told to use one. A reload picks up new files.
            parameters.update(ssl="on", ssl_cert_file=pki.PG_SERVER_CERT, ssl_key_file=pki.PG_SERVER_KEY,
                              ssl_ca_file=pki.PG_CA, ssl_min_protocol_version="TLSv1.2")
        return parameters

    def render_config(self, inv: Inventory, host: HostSpec, secrets: DbSecrets, extra_parameters: dict[str, str]) -> str:
        pg = inv.cluster.postgres
        etcd_hosts = [f"{m.address}:{inv.cluster.etcd.client_port}" for m in inv.etcd_members]
        rest_port = inv.cluster.patroni.rest_port
        leader_away = shlex.join(etcd_config.leader_away_command(inv, host).argv)
        config: dict = {
            "scope": inv.cluster.name,
            "namespace": f"{inv.cluster.etcd.prefix}/patroni/",
            "name": host.name,
            "restapi": {
                "listen": f"{host.address}:{rest_port}",
                "connect_address": f"{host.address}:{rest_port}",
            },
            "etcd3": self._etcd(inv, etcd_hosts),
            "bootstrap": {
                "dcs": self.dynamic_configuration(inv, extra_parameters),
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"{host.address},127.0.0.1:{pg.port}",
                "connect_address": f"{host.address}:{pg.port}",
                "data_dir": pg.data_dir,
                "bin_dir": pg.bin_dir,
                "pgpass": PGPASS_PATH,
                # Local connections go through the socket with peer auth: no password over TCP.
                "use_unix_socket": True,
                "use_unix_socket_repl": False,
                "authentication": self._authentication(inv, secrets),
                "parameters": self._local_parameters(inv),
                "pg_hba": self.pg_hba(inv, secrets),
                "create_replica_methods": ["basebackup"],
                "basebackup": [{"checkpoint": "fast"}],
                # Patroni appends action, role and scope; the script acts only when the role is primary.
                "callbacks": {
                    "on_start": leader_away,
                    "on_role_change": leader_away,
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }
        if secrets.rest_api_password:
            config["restapi"]["authentication"] = {"username": REST_USER, "password": secrets.rest_api_password}
            config["ctl"] = {"insecure": False}
        if inv.cluster.tls.enabled:
            # Every caller shows a certificate of the cluster's CA, reads included (the health checks,
            # patronictl, the other members); Patroni presents its server pair to its peers too.
            config["restapi"].update(certfile=pki.PG_SERVER_CERT, keyfile=pki.PG_SERVER_KEY, cafile=pki.PG_CA,
                                     verify_client="required")
            config["ctl"] = {"insecure": False, "cacert": pki.PG_CA, "certfile": pki.PG_SERVER_CERT,
                             "keyfile": pki.PG_SERVER_KEY}
        header = "# Managed by bouwsteen (build_cluster / add_standby). Local edits are overwritten.\n"
        return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)

    def render_primary_proxy(self, inv: Inventory, host: HostSpec) -> str:
        """stolon-proxy's contract with HAProxy: the proxy port of every database host leads to
        the primary, and to nothing when there is none or there are two."""
        spec = inv.cluster.patroni
        tls = inv.cluster.tls.enabled
        # The checks ask Patroni's REST API over TLS with the check's client pair (Patroni wants one);
        # each server's certificate must name it.
        check_tls = f" check-ssl verify required ca-file {pki.PG_CA} crt {REST_CHECK_PEM}" if tls else ""
        servers = [f"    server {h.name} {h.address}:{inv.cluster.postgres.port}"
                   + (f" verifyhost {h.name}" if tls else "") for h in inv.db_hosts]
        # The routers send a new primary's clients to its own port: that is the one check the
        # write gap waits for, so this host asks its own Patroni more often while it is down.
        routed = [line + (" downinter 200ms" if h.name == host.name else "") for h, line in zip(inv.db_hosts, servers)]
        lines = haproxy.preamble(f"Managed by bouwsteen (build_cluster / add_standby): port {spec.proxy_port} "
                                 "leads to the primary. Local edits are overwritten.")
        lines += [
            "frontend primary",
            f"    bind {host.address}:{spec.proxy_port}",
            f"    bind 127.0.0.1:{spec.proxy_port}",
            # Exactly one leader, and no other PostgreSQL out of recovery (a standby promoted behind
            # Patroni's back): otherwise the connection is refused before it reaches any server.
            "    tcp-request connection reject unless { nbsrv(primary) eq 1 } { nbsrv(out_of_recovery) le 1 }",
            "    default_backend primary",
            "",
            "backend primary",
            # A connection the old primary refuses fails at once (no retries, whose turnaround is a
            # second each: a switchover's client hung 2 s on the lab) and counts as a failed check
            # (observe layer4, fail-check): with its failing health check that is down at once, yet
            # a single refused connection never closes a healthy primary's sessions.
            "    retries 0",
            # /primary answers 200 while Patroni holds the leader key, even before PostgreSQL has left
            # recovery; the body's role says it has, so a promotion is only routed once it can write.
            # A demoting primary keeps the key and the role until about a second after its
            # PostgreSQL began to stop, which its state ("stopping") says at once: while it still
            # counted, the frontend saw two primaries and refused the new one (a second per switchover).
            "    option httpchk",
            "    http-check send meth GET uri /primary",
            "    http-check expect status 200",
            f"    http-check expect rstring {PRIMARY_ROLE_BODY}",
            f"    http-check expect rstring {RUNNING_STATE_BODY}",
            # stolon-proxy closes its clients' connections when the master moves; so does this.
            # inter 500ms: only the primary is UP here, so the faster check costs one request a second.
            "    default-server inter 500ms fastinter 500ms downinter 500ms fall 2 rise 1 observe layer4 error-limit 1 "
            f"on-error fail-check on-marked-down shutdown-sessions check port {spec.rest_port}{check_tls} maxconn 1000",
            *routed,
            "",
            "backend out_of_recovery",
            # Never sent traffic: it counts the PostgreSQLs that answer as primary, leader or not.
            # fall 1: a demoted primary stops counting at its first check, not its second.
            "    option httpchk",
            "    http-check send meth GET uri /health",
            f"    http-check expect rstring {PRIMARY_ROLE_BODY}",
            f"    default-server inter 1s fall 1 rise 1 check port {spec.rest_port}{check_tls}",
            *servers,
            "",
        ]
        return "\n".join(lines)

    def host_files(
        self, inv: Inventory, host: HostSpec, secrets: DbSecrets, extra_parameters: dict[str, str]
    ) -> list[ManagedFile]:
        return [
            ManagedFile(
                CONFIG_PATH, self.render_config(inv, host, secrets, extra_parameters),
                owner="postgres", group="postgres", mode=0o600, secret=True,
            ),
            ManagedFile(haproxy.HAPROXY_CFG, self.render_primary_proxy(inv, host), owner="root", mode=0o644),
        ]

    def host_units(self, inv: Inventory, host: HostSpec) -> list[Unit]:
        # Patroni re-reads its file on SIGHUP (ExecReload) and applies pg_hba/parameters itself.
        # Debian's HAProxy unit checks the file (`haproxy -c`) before it reloads: a bad one is never live.
        # Patroni reloads PostgreSQL on every SIGHUP: that is how a new server certificate is taken.
        tls = pki.tls_paths() if inv.cluster.tls.enabled else ()
        check = (REST_CHECK_PEM, pki.PG_CA) if inv.cluster.tls.enabled else ()
        return [Unit("patroni.service", reload_on=(CONFIG_PATH, *tls), package="patroni"),
                Unit(haproxy.HAPROXY_UNIT, reload_on=(haproxy.HAPROXY_CFG, *check), package="haproxy")]

    def tls_reloaded_commands(self, inv: Inventory, host: HostSpec) -> list[Command]:
        """Patroni re-reads its REST API's certificate only on a SIGHUP that finds its config file
        unchanged (patroni/__main__.py: a changed local config skips the certificate check), so a
        reload that took a new pg_hba and a new certificate together leaves the old one served.
        Reload again until the API presents the file's serial: bounded, and every try is checked."""
        address = f"{host.address}:{inv.cluster.patroni.rest_port}"
        return [script(
            'want=$(openssl x509 -noout -serial -in "$1")\n'
            'for try in $(seq 1 30); do\n'
            # Right after a reload the API may be re-opening its socket: no answer is a "not yet".
            '  got=$(timeout 5 openssl s_client -connect "$4" -CAfile "$3" -cert "$1" -key "$2" </dev/null 2>/dev/null'
            ' | openssl x509 -noout -serial 2>/dev/null) || got=""\n'
            '  [ "$got" = "$want" ] && exit 0\n'
            '  systemctl reload patroni.service; sleep 2\n'
            'done\n'
            'echo "the REST API on $4 still presents ${got:-nothing} instead of $want" >&2; exit 1',
            args=[pki.PG_SERVER_CERT, pki.PG_SERVER_KEY, pki.PG_CA, address], timeout=240,
            description=f"the REST API on {address} presents the new certificate",
        )]

    def tls_files(self, inv: Inventory, host: HostSpec, ca: pki.ClusterCA) -> list[ManagedFile]:
        issued = ca.issue(pki.Identity(REST_CHECK_CLIENT, server=False), pki.current_period(inv),
                          inv.cluster.tls.generation)
        return [ManagedFile(REST_CHECK_PEM, issued.certificate_pem + issued.private_key_pem, owner="root", mode=0o600,
                            secret=True)]

    def bootstrap_commands(self, inv: Inventory, secrets: DbSecrets, extra_parameters: dict[str, str]) -> list[Command]:
        return []  # the first Patroni to take the initialize key runs initdb itself

    # ------------------------------------------------------------------ status

    def status_commands(self, inv: Inventory) -> list[Command]:
        return [patronictl("list", "-f", "json", timeout=20)]

    def parse_status(self, inv: Inventory, results: list[CommandResult]) -> ClusterView:
        if not results:
            raise HaStatusError("patronictl list: no output")
        result = results[0]
        if result.exit_code != 0:
            raise HaStatusError(f"patronictl list failed ({result.exit_code}): {result.stderr.strip()[-300:]}")
        try:
            rows = json.loads(result.stdout or "null")
        except json.JSONDecodeError as exc:
            raise HaStatusError(f"patronictl list printed no JSON: {exc}") from None
        if not isinstance(rows, list):
            raise HaStatusError("patronictl list: expected a JSON list of members")
        names = {h.name for h in inv.hosts}
        members: list[Member] = []
        for row in rows:
            try:
                name = row["Member"]
                role_text = str(row["Role"]).lower()
                state = str(row["State"]).lower()
            except (KeyError, TypeError) as exc:
                raise HaStatusError(f"patronictl list: member without {exc}") from None
            if name not in names:
                raise HaStatusError(f"patronictl list: member {name!r} is not in the inventory of {inv.cluster.name}")
            role = _ROLE.get(role_text, "unknown")
            lag = row.get("Lag in MB")
            lag_bytes = int(float(lag) * 1024 * 1024) if isinstance(lag, (int, float)) else (0 if role == "primary" else None)
            healthy = state in ("running", "streaming") and role != "unknown"
            members.append(
                Member(
                    name=name, address=str(row.get("Host", "")).rsplit(":", 1)[0], role=role, healthy=healthy,
                    state=state if role_text != "sync standby" else f"{state} (sync)",
                    timeline=row.get("TL") if isinstance(row.get("TL"), int) else None, lag_bytes=lag_bytes,
                    synchronous=role_text == "sync standby",
                    pending_restart=bool(row.get("Pending restart")),
                    drained=_drained(row.get("Tags")),
                )
            )
        leaders = [m.name for m in members if m.role == "primary"]
        return ClusterView(
            initialized=bool(members), members=tuple(sorted(members, key=lambda m: m.name)),
            leader=leaders[0] if len(leaders) == 1 else None,
        )

    # ------------------------------------------------------------------ role changes

    def switchover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        if view.leader is None:
            raise HaStatusError("switchover needs a leader; there is none (use failover)")
        return [patronictl("switchover", "--leader", view.leader, "--candidate", candidate, "--force",
                           inv.cluster.name, timeout=90)]

    def failover_commands(self, inv: Inventory, view: ClusterView, candidate: str) -> list[Command]:
        return [patronictl("failover", "--candidate", candidate, "--force", inv.cluster.name, timeout=90)]

    def settings_commands(self, inv: Inventory, settings: HaSettings) -> list[Command]:
        args: list[str] = []
        if settings.synchronous_replication is not None:
            args += ["-s", f"synchronous_mode={'true' if settings.synchronous_replication else 'false'}"]
        for key, value in sorted(settings.postgres_parameters.items()):
            # patronictl reads each value as YAML: unquoted, `on` would become a Boolean, `%m [%p]`
            # a syntax error and `[a, b]` a list. A JSON string is a YAML string, kept as typed.
            args += ["-p", f"{key}={json.dumps(str(value))}"]
        if not args:
            return []
        return [patronictl("edit-config", "--force", "--quiet", *args, inv.cluster.name)]

    def show_config_command(self, inv: Inventory) -> Command:
        return patronictl("show-config", inv.cluster.name, timeout=20)

    def restart_commands(self, inv: Inventory, host: str) -> list[Command]:
        # The REST call returns once PostgreSQL is back (or has failed to come back).
        return [_until_success("Success: restart on member", "restart", "--force", inv.cluster.name, host,
                               timeout=300, description=f"patronictl restart {inv.cluster.name} {host}")]

    def drain_commands(self, inv: Inventory, host: HostSpec, drained: bool) -> list[Command]:
        # Tags are local configuration, read again on SIGHUP and published with the member's key
        # on its next HA loop; the leader then moves the synchronous role away. Only the two tag
        # lines of render_config's own file change, so the file is byte for byte the rendered one
        # again when the member is counted in (build_cluster sees no drift).
        value = "true" if drained else "false"
        return [script(
            'grep -q "^  nofailover: " "$1" && grep -q "^  nosync: " "$1" || '
            '{ echo "$1 has no nofailover/nosync tag lines: not written by bouwsteen" >&2; exit 1; }\n'
            'sed -i -e "s/^  nofailover: .*/  nofailover: $2/" -e "s/^  nosync: .*/  nosync: $2/" "$1"\n'
            'systemctl reload patroni.service',
            args=[CONFIG_PATH, value], timeout=60,
            description=f"Patroni tags nofailover and nosync {value} on {host.name}",
        )]

    def maintenance_commands(self, inv: Inventory, paused: bool) -> list[Command]:
        # --wait: until every member's REST API reports the new state (it polls the DCS for
        # loop_wait + 1 s). patronictl exits 1 when the state already holds; a runbook reads it first.
        verb, done = ("pause", "paused") if paused else ("resume", "resumed")
        return [_until_success(f"Success: cluster management is {done}", verb, "--wait", inv.cluster.name,
                               timeout=90, description=f"patronictl {verb} --wait {inv.cluster.name}")]

    def is_paused(self, config: dict) -> bool:
        # Patroni's own reading (global_config.check_mode, utils.parse_bool).
        return str(config.get("pause")).strip().lower() in ("true", "on", "yes", "1")

    def managed_parameters(self, inv: Inventory, extra_parameters: dict[str, str]) -> dict[str, str | None]:
        owned: dict[str, str | None] = dict.fromkeys(PATRONI_OWNED_PARAMETERS)
        if inv.cluster.postgres.synchronous_replication:
            owned["synchronous_standby_names"] = None
        dynamic = self.dynamic_configuration(inv, extra_parameters)["postgresql"]["parameters"]
        return {**{k.lower(): str(v) for k, v in {**dynamic, **self._local_parameters(inv)}.items()}, **owned}

    def listeners(self, inv: Inventory) -> dict[int, frozenset[str]]:
        # Debian's Patroni runs as `patroni`; one from PyPI in a venv shows as python3.
        return {inv.cluster.patroni.rest_port: frozenset({"patroni", "python3"}),
                inv.cluster.patroni.proxy_port: frozenset({"haproxy"})}

    def config_paths(self, inv: Inventory) -> list[str]:
        return [CONFIG_PATH]

    def rw_port(self, inv: Inventory) -> int:
        return inv.cluster.patroni.proxy_port

    def pgdata(self, inv: Inventory) -> str:
        return inv.cluster.postgres.data_dir

    def socket_dir(self, inv: Inventory) -> str:
        return "/var/run/postgresql"  # Debian's packages

    def socket_needs_password(self, inv: Inventory) -> bool:
        return False  # pg_hba: `local all postgres peer` (see pg_hba())

    def membership_commands(self, inv: Inventory, extra_parameters: dict[str, str]) -> list[Command]:
        # pg_hba lives in each member's patroni.yml, which the runbook rewrites and reloads.
        return []

    def parse_config(self, result: CommandResult) -> dict:
        if result.exit_code != 0:
            raise HaStatusError(f"patronictl show-config failed: {result.stderr.strip()[-300:]}")
        data = yaml.safe_load(result.stdout) or {}
        if not isinstance(data, dict):
            raise HaStatusError("patronictl show-config: not a mapping")
        return data

    def settings_drift(self, inv: Inventory, current: dict, extra_parameters: dict[str, str]) -> HaSettings:
        """What differs between the DCS configuration and the inventory (empty = nothing to do)."""
        wanted = self.dynamic_configuration(inv, extra_parameters)
        current_params = {k: str(v) for k, v in (current.get("postgresql", {}).get("parameters") or {}).items()}
        changed = {k: v for k, v in wanted["postgresql"]["parameters"].items() if _norm(current_params.get(k)) != _norm(v)}
        sync = None
        if bool(current.get("synchronous_mode", False)) != wanted["synchronous_mode"]:
            sync = wanted["synchronous_mode"]
        return HaSettings(synchronous_replication=sync, postgres_parameters=changed)

    def reinit_commands(self, inv: Inventory, view: ClusterView, host: str) -> list[Command]:
        # --wait: without it patronictl returns at once, and a member seen streaming a moment later
        # may be the one about to be wiped, so "re-cloned" would be declared too early.
        return [patronictl("reinit", "--force", "--wait", inv.cluster.name, host, timeout=600)]

    def member_removed_commands(self, inv: Inventory, host: str) -> list[Command]:
        # A stopped member's key expires with its TTL; nothing else names it.
        return []

    def member_slot(self, inv: Inventory, host: str) -> str | None:
        # Patroni's slot_name_from_member_name: lower case, anything outside [a-z0-9_] becomes '_'.
        return re.sub(r"[^a-z0-9_]", "_", host.lower())[:63]

    def slot_retention_commands(self, inv: Inventory, current: dict) -> tuple[list[Command], list[Command]]:
        """Patroni 3 drops a member's slot once its key is gone. From 4.0 the leader keeps it
        member_slots_ttl (default 30 min) and recreates a slot dropped by hand (dcs
        `_build_retain_slots`), holding WAL for a member removed for good. A leader cycle with the
        setting at 0 forgets every absent member's slot; then the setting goes back."""
        previous = current.get("member_slots_ttl")
        if previous is not None and not re.fullmatch(r"[0-9]+[a-z]*", str(previous)):
            raise HaStatusError(f"patronictl show-config: member_slots_ttl {previous!r} is no duration")
        restore = "null" if previous is None else str(previous)
        edit = ("edit-config", "--force", "--quiet", "-s")
        return ([patronictl(*edit, "member_slots_ttl=0", inv.cluster.name)],
                [patronictl(*edit, f"member_slots_ttl={restore}", inv.cluster.name)])


def _norm(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    return {"true": "on", "false": "off"}.get(text, text)
