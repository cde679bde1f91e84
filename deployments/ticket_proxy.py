"""The ticket proxy: the one entry a ticketing system gets, in front of the Prefect API.

Prefect's open-source server has one credential for everything (the admin auth string), so a
ticketing system must not hold it. It talks to this proxy instead, Debian's nginx with the njs
module, with a credential of its own (`<PREFECT_HOME>/auth/ticket-auth`) that may only:

- find an allow-listed deployment by name: `GET /api/deployments/name/<flow>/<deployment>`;
- start a run of one: `POST /api/deployments/<id>/create_flow_run`, whose body holds only
  `parameters` (names the flow takes, `cluster` only the deployment's own), `tags` (`ticket:<id>`)
  and `idempotency_key`;
- read runs and artifacts: `GET /api/flow_runs/<id>`, `POST /api/flow_runs/filter`,
  `POST /api/artifacts/filter` (flow run parameters and artifacts carry no secrets, by the
  project's rule, checked by tests/integration/test_95_secrets.py).

Everything else (blocks, variables, changing or deleting deployments, other deployments,
`include_secrets`, the UI) answers 403 with a `detail`. The proxy adds the admin auth string on
the way to Prefect; it lives only in the proxy's 0600 configuration, read by nginx's root master
process. The ticket password is stored only as a salted hash.

Pure parts (tested as tables in tests/unit/test_ticket_proxy.py): `allow_list` (which
deployments, which parameter names, which cluster), `policy`, `render_gate`, `render_nginx`.
The rest is small I/O: read the deployments, write the files, start or reload nginx.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import subprocess
import time
from base64 import b64encode
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from secrets import token_hex
from urllib.parse import urlsplit

import httpx

from deployments import credentials
from tasks.errors import ServiceDidNotStart

PROXY_DIR = "ticket-proxy"
NGINX = "/usr/sbin/nginx"
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
GATE_SOURCE = Path(__file__).with_name("ticket_gate.js")
# A run's or a filter's body is a few hundred bytes; the gate reads it in memory, never from a file.
BODY_LIMIT = 64 * 1024
DEPLOYMENT_TAG = "bouwsteen"
APT_HINT = "apt-get install nginx-light libnginx-mod-http-js (./run.sh installs them)"


def ticket_flows() -> frozenset[str]:
    """The runbooks a ticket may start: every registered flow. Narrow it here for a site."""
    from flows.registry import FLOWS

    return frozenset(FLOWS)


def listen_address(server_port: int) -> tuple[str, int]:
    """Where the proxy listens: $BOUWSTEEN_TICKET_LISTEN (`ADDRESS:PORT`), else 127.0.0.1 on the
    port after the server's (4200 → 4201). A site exposes it by setting the address."""
    explicit = os.environ.get("BOUWSTEEN_TICKET_LISTEN")
    if explicit:
        host, sep, port = explicit.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"BOUWSTEEN_TICKET_LISTEN={explicit!r}: expected ADDRESS:PORT")
        return host.strip("[]"), int(port)
    return "127.0.0.1", server_port + 1


def ticket_url(server_port: int | None = None) -> str:
    """The API as a ticketing system reaches it: $BOUWSTEEN_TICKET_URL, else this controller's proxy."""
    explicit = os.environ.get("BOUWSTEEN_TICKET_URL")
    if explicit:
        return explicit.rstrip("/")
    if server_port is None:
        from deployments.server import DEFAULT_PORT, api_url

        server_port = urlsplit(api_url()).port or DEFAULT_PORT
    host, port = listen_address(server_port)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "*") else host
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}/api"


# ---------------------------------------------------------------------------------------------
# Pure: the allow-list and the files


@dataclass(frozen=True)
class Allowed:
    """A deployment a ticket may start, and how."""

    id: str
    name: str  # "<flow>/<deployment>", as in GET /api/deployments/name/<flow>/<deployment>
    cluster: str  # the only value `parameters.cluster` may take
    parameters: tuple[str, ...]  # the names the flow takes (its parameter_openapi_schema)


def allow_list(deployments: Iterable[dict], flow_names: dict[str, str], flows: Iterable[str],
               tag: str = DEPLOYMENT_TAG) -> list[Allowed]:
    """The deployments (as the API returns them) a ticket may start: those `bouwsteen deploy`
    made (tag `bouwsteen`) of a flow in `flows`, with a `cluster` parameter to pin, whose
    server-side parameter check is on. Sorted by name."""
    wanted = set(flows)
    allowed = []
    for d in deployments:
        flow = flow_names.get(str(d.get("flow_id")))
        cluster = (d.get("parameters") or {}).get("cluster")
        properties = ((d.get("parameter_openapi_schema") or {}).get("properties") or {})
        if (flow not in wanted or tag not in (d.get("tags") or []) or not isinstance(cluster, str)
                or not d.get("enforce_parameter_schema") or "cluster" not in properties):
            continue
        allowed.append(Allowed(id=str(d["id"]), name=f"{flow}/{d['name']}", cluster=cluster,
                               parameters=tuple(sorted(properties))))
    return sorted(allowed, key=lambda a: a.name)


def policy(allowed: Iterable[Allowed]) -> dict:
    """What the gate knows, as JSON: deployments by id and ids by name, plus a digest of both."""
    deployments = {a.id: {"name": a.name, "cluster": a.cluster, "parameters": list(a.parameters)} for a in allowed}
    names = {d["name"]: i for i, d in deployments.items()}
    if len(names) != len(deployments):
        raise ValueError("two allow-listed deployments share a name")
    body = {"deployments": deployments, "names": names}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"digest": digest, **body}


def render_gate(policy_: dict, *, user: str, salt: str, password_sha256: str, source: str) -> str:
    """The njs module nginx imports: the policy and the ticket credential's hash, then the gate."""
    credential = {"user": user, "salt": salt, "sha256": password_sha256}
    return ("// Rendered by deployments/ticket_proxy.py from the server's deployments; do not edit.\n"
            f"var POLICY = {json.dumps(policy_, sort_keys=True)};\n"
            f"var CREDENTIAL = {json.dumps(credential, sort_keys=True)};\n\n{source}")


@dataclass(frozen=True)
class NginxConfig:
    directory: Path  # nginx's prefix: pid, logs, temp paths, the gate
    listen: str  # "127.0.0.1:4201" (or "unix:/path")
    upstream_server: str  # "127.0.0.1:4200" (or "unix:/path"): the Prefect server
    admin_auth: str  # "user:password", sent upstream as HTTP Basic
    upstream_scheme: str = "http"
    worker_user: str | None = None  # when started as root
    njs_module: str = NJS_MODULE
    body_limit: int = BODY_LIMIT


def upstream_parts(api_url: str) -> tuple[str, str]:
    """http://127.0.0.1:4200/api → ("http", "127.0.0.1:4200"); the gate's paths start with /api."""
    parts = urlsplit(api_url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path != "/api":
        raise ValueError(f"{api_url!r}: the ticket proxy fronts an http(s)://HOST[:PORT]/api URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return parts.scheme, f"{host}:{port}"


def listen_directive(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_nginx(cfg: NginxConfig) -> str:
    token = b64encode(cfg.admin_auth.encode()).decode()
    d = cfg.directory
    tls = ("            proxy_ssl_server_name on;\n            proxy_ssl_verify on;\n"
           "            proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;\n"
           ) if cfg.upstream_scheme == "https" else ""
    user = f"user {cfg.worker_user};\n" if cfg.worker_user else ""
    return f"""\
# Rendered by deployments/ticket_proxy.py; do not edit. Holds the admin auth string: 0600, root.
load_module {cfg.njs_module};
{user}daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    server_tokens off;
    log_format tickets '$remote_addr $remote_user [$time_local] "$request" $status $body_bytes_sent $request_time';
    access_log {d}/access.log tickets;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    js_import gate from {d}/ticket_gate.js;
    upstream prefect {{
        server {cfg.upstream_server};
        keepalive 8;
    }}
    server {{
        listen {cfg.listen};
        client_max_body_size {cfg.body_limit};
        client_body_buffer_size {cfg.body_limit};
        client_body_in_single_buffer on;
        error_page 413 @too_large;
        location @too_large {{
            default_type application/json;
            return 413 '{{"detail": "the body is larger than {cfg.body_limit} bytes"}}';
        }}
        location / {{
            js_content gate.handle;
        }}
        location @prefect {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;
            proxy_set_header Authorization "Basic {token}";
            # Prefect parses the body as the JSON object the gate checked, whatever the client said.
            proxy_set_header Content-Type "application/json";
            proxy_max_temp_file_size 0;
            proxy_read_timeout 120s;
{tls}            proxy_pass {cfg.upstream_scheme}://prefect;
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------------------
# I/O: deployments from the server, files, the nginx process


def proxy_dir(prefect_home: Path) -> Path:
    return prefect_home / PROXY_DIR


def _auth(admin_auth: str) -> tuple[str, str]:
    user, _, password = admin_auth.partition(":")
    return user, password


def fetch_allow_list(upstream: str, admin_auth: str, flows: Iterable[str] | None = None) -> list[Allowed]:
    """The deployments tagged `bouwsteen` on the server, paged (the server caps a page at 200)."""
    deployments: list[dict] = []
    flows_found: list[dict] = []
    try:
        with httpx.Client(base_url=upstream.rstrip("/"), auth=_auth(admin_auth), timeout=30) as http:
            while True:
                page = http.post("/deployments/filter", json={
                    "deployments": {"tags": {"all_": [DEPLOYMENT_TAG]}}, "limit": 200, "offset": len(deployments)})
                page.raise_for_status()
                deployments += page.json()
                if len(page.json()) < 200:
                    break
            flow_ids = sorted({str(d["flow_id"]) for d in deployments})
            if flow_ids:
                found = http.post("/flows/filter", json={"flows": {"id": {"any_": flow_ids}}})
                found.raise_for_status()
                flows_found = found.json()
    except httpx.HTTPError as exc:
        raise ServiceDidNotStart(f"the ticket proxy's allow-list: cannot read the deployments at {upstream}: {exc}") from None
    names = {str(f["id"]): f["name"] for f in flows_found}
    return allow_list(deployments, names, ticket_flows() if flows is None else flows)


def _write_private(path: Path, content: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.replace(tmp, path)


def _worker_user() -> str | None:
    """nginx's workers never run as root; they read no file of ours (the master reads them all)."""
    if os.geteuid() != 0:
        return None
    for user in ("www-data", "nobody"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    return None


def _pid(directory: Path) -> int | None:
    try:
        pid = int((directory / "nginx.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # The master's title names its configuration: a recycled pid is not taken for ours.
    return pid if b"nginx" in cmdline and f"{directory}/nginx.conf".encode() in cmdline else None


def _state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class ProxyHandle:
    url: str
    pid: int
    digest: str
    deployments: list[str]


def _check_installed() -> None:
    for path in (NGINX, NJS_MODULE):
        if not Path(path).exists():
            raise ServiceDidNotStart(f"the ticket proxy needs {path}: {APT_HINT}")


def ensure_running(prefect_home: Path, *, upstream: str, admin_auth: str, listen: tuple[str, int],
                   timeout: float = 15) -> ProxyHandle:
    """Render the allow-list from the server's deployments, then start nginx or reload it. Idempotent."""
    _check_installed()
    directory = proxy_dir(prefect_home)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    (directory / "tmp").mkdir(exist_ok=True)
    ticket_user, _, ticket_password = credentials.ticket_auth_string(prefect_home).partition(":")
    allowed = fetch_allow_list(upstream, admin_auth)
    policy_ = policy(allowed)
    salt = token_hex(16)
    _write_private(directory / "ticket_gate.js", render_gate(
        policy_, user=ticket_user, salt=salt, password_sha256=credentials.password_digest(ticket_password, salt),
        source=GATE_SOURCE.read_text()))
    scheme, server = upstream_parts(upstream)
    cfg = NginxConfig(directory=directory, listen=listen_directive(*listen), upstream_server=server,
                      upstream_scheme=scheme, admin_auth=admin_auth, worker_user=_worker_user())
    _write_private(directory / "nginx.conf", render_nginx(cfg))
    _write_private(directory / "state.json", json.dumps(
        {"upstream": upstream, "listen": list(listen), "digest": policy_["digest"]}))
    base = ["-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", str(directory / "error.log")]
    check = subprocess.run([NGINX, "-t", "-q", *base], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise ServiceDidNotStart(f"ticket proxy configuration refused by nginx: {check.stderr.strip()}")
    pid = _pid(directory)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)  # re-reads the configuration and the gate; old workers finish their requests

        def alive() -> bool:
            return _pid(directory) == pid
    else:
        log = open(directory / "nginx.out", "ab")
        proc = subprocess.Popen([NGINX, *base], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        pid = proc.pid

        def alive() -> bool:
            return proc.poll() is None
    host = "127.0.0.1" if listen[0] in ("0.0.0.0", "::", "*") else listen[0]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{listen[1]}"
    _wait_for_policy(url, (ticket_user, ticket_password), policy_["digest"], alive, directory, timeout)
    return ProxyHandle(url=f"{url}/api", pid=pid, digest=policy_["digest"], deployments=[a.name for a in allowed])


def _wait_for_policy(url: str, auth: tuple[str, str], digest: str, alive, directory: Path, timeout: float) -> None:
    """Until the proxy answers with this policy (a reload takes effect once new workers run)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            response = httpx.get(f"{url}/bouwsteen/allow-list", auth=auth, timeout=3)
            if response.status_code == 200 and response.json().get("digest") == digest:
                return
            last = f"HTTP {response.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            last = type(exc).__name__
        if not alive():
            raise ServiceDidNotStart(f"the ticket proxy (nginx) exited; see {directory}/error.log and nginx.out")
        if time.monotonic() > deadline:
            raise ServiceDidNotStart(f"the ticket proxy at {url} did not serve the new allow-list within "
                                     f"{timeout:.0f}s ({last}); see {directory}/error.log")
        time.sleep(0.1)


def refresh(prefect_home: Path, admin_auth: str) -> ProxyHandle | None:
    """After `bouwsteen deploy`: the running proxy's allow-list re-rendered, nginx reloaded."""
    directory = proxy_dir(prefect_home)
    state = _state(directory)
    if state is None or _pid(directory) is None:
        return None
    return ensure_running(prefect_home, upstream=state["upstream"], admin_auth=admin_auth,
                          listen=(state["listen"][0], int(state["listen"][1])))


def stop(prefect_home: Path, upstream_port: int | None = None, timeout: float = 10) -> bool:
    """Stop this home's proxy (only if it fronts `upstream_port`, when given)."""
    directory = proxy_dir(prefect_home)
    pid = _pid(directory)
    state = _state(directory) or {}
    if pid is None:
        return False
    if upstream_port is not None and state.get("upstream") and urlsplit(state["upstream"]).port != upstream_port:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it, or it lingers as a zombie
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    (directory / "nginx.pid").unlink(missing_ok=True)
    return True
