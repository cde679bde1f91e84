"""deployments/ticket_proxy.py: which deployments a ticket may start (pure, from the API's
deployments), the files nginx gets, and the gate itself: the rendered njs module run by the real
nginx against a stub Prefect on Unix sockets, as a table of requests and answers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from base64 import b64encode
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from deployments import ticket_proxy
from deployments.credentials import password_digest
from deployments.ticket_proxy import (
    Allowed,
    NginxConfig,
    allow_list,
    policy,
    render_gate,
    render_nginx,
)

FLOWS = {"f-check": "check_hosts", "f-switch": "switchover", "f-other": "someone_elses_flow"}
SCHEMA = {"properties": {"cluster": {"type": "string"}, "candidate": {"type": "string"},
                         "dry_run": {"type": "boolean"}}}


def deployment(id_: str, flow_id: str = "f-switch", name: str = "lab", **over) -> dict:
    return {"id": id_, "flow_id": flow_id, "name": name, "tags": ["bouwsteen", f"cluster:{name}"],
            "parameters": {"cluster": name}, "enforce_parameter_schema": True, "parameter_openapi_schema": SCHEMA,
            **over}


# ---------------------------------------------------------------------------------------------
# The allow-list


def test_allow_list_takes_the_deployments_bouwsteen_made_with_their_parameter_names_and_cluster():
    allowed = allow_list([deployment("2", name="prod"), deployment("1")], FLOWS, ["switchover", "check_hosts"])
    assert allowed == [
        Allowed(id="1", name="switchover/lab", cluster="lab", parameters=("candidate", "cluster", "dry_run")),
        Allowed(id="2", name="switchover/prod", cluster="prod", parameters=("candidate", "cluster", "dry_run")),
    ]


@pytest.mark.parametrize("why, over", [
    ("a flow tickets may not start", {"flow_id": "f-check"}),
    ("a flow bouwsteen does not know", {"flow_id": "f-other"}),
    ("a flow the server does not name", {"flow_id": "f-gone"}),
    ("not made by bouwsteen deploy", {"tags": ["cluster:lab"]}),
    ("no cluster to pin", {"parameters": {}}),
    ("a cluster that is not a name", {"parameters": {"cluster": ["lab"]}}),
    ("the server's parameter check off", {"enforce_parameter_schema": False}),
    ("a flow without a cluster parameter", {"parameter_openapi_schema": {"properties": {"x": {}}}}),
    ("no schema at all", {"parameter_openapi_schema": None}),
])
def test_allow_list_leaves_out(why, over):
    assert allow_list([deployment("1", **over)], FLOWS, ["switchover"]) == [], why


def test_every_registered_flow_may_be_started_by_a_ticket_by_default():
    from flows.registry import FLOWS as REGISTERED

    assert ticket_proxy.ticket_flows() == frozenset(REGISTERED)


def test_policy_maps_ids_and_names_and_its_digest_follows_the_content():
    one = policy([Allowed("1", "switchover/lab", "lab", ("cluster",))])
    assert one["deployments"] == {"1": {"name": "switchover/lab", "cluster": "lab", "parameters": ["cluster"]}}
    assert one["names"] == {"switchover/lab": "1"}
    assert one["digest"] == policy([Allowed("1", "switchover/lab", "lab", ("cluster",))])["digest"]
    assert one["digest"] != policy([Allowed("1", "switchover/lab", "lab", ("cluster", "dry_run"))])["digest"]
    assert policy([])["deployments"] == {}
    with pytest.raises(ValueError, match="share a name"):
        policy([Allowed("1", "switchover/lab", "lab", ()), Allowed("2", "switchover/lab", "lab", ())])


# ---------------------------------------------------------------------------------------------
# Rendering


def test_the_gate_module_starts_with_its_policy_and_the_hash_of_the_ticket_password():
    text = render_gate({"digest": "d", "deployments": {}, "names": {}}, user="ticket", salt="s",
                       password_sha256=password_digest("pw", "s"), source="export default {};\n")
    lines = text.splitlines()
    assert lines[0].startswith("// Rendered by deployments/ticket_proxy.py")
    assert json.loads(lines[1].removeprefix("var POLICY = ").removesuffix(";"))["digest"] == "d"
    credential = json.loads(lines[2].removeprefix("var CREDENTIAL = ").removesuffix(";"))
    assert credential == {"user": "ticket", "salt": "s", "sha256": password_digest("pw", "s")}
    assert "pw" not in text.replace(password_digest("pw", "s"), "")
    assert text.endswith("export default {};\n")


def nginx_config(**over) -> NginxConfig:
    fields = dict(directory=Path("/var/lib/bouwsteen/prefect/ticket-proxy"), listen="127.0.0.1:4201",
                  upstream_server="127.0.0.1:4200", admin_auth="admin:SECRET")
    return NginxConfig(**{**fields, **over})


def test_nginx_config_listens_on_loopback_and_adds_the_admin_credential_upstream_only():
    text = render_nginx(nginx_config(worker_user="www-data"))
    token = b64encode(b"admin:SECRET").decode()
    for line in ["load_module /usr/lib/nginx/modules/ngx_http_js_module.so;", "user www-data;", "daemon off;",
                 "listen 127.0.0.1:4201;", "server 127.0.0.1:4200;", "js_content gate.handle;",
                 f'proxy_set_header Authorization "Basic {token}";', "proxy_pass http://prefect;",
                 "js_import gate from /var/lib/bouwsteen/prefect/ticket-proxy/ticket_gate.js;",
                 "pid /var/lib/bouwsteen/prefect/ticket-proxy/nginx.pid;",
                 # The gate reads the body in memory: never a temp file it cannot see.
                 f"client_max_body_size {ticket_proxy.BODY_LIMIT};",
                 f"client_body_buffer_size {ticket_proxy.BODY_LIMIT};"]:
        assert line in text, line
    assert "SECRET" not in text  # only as the Basic token
    assert "location @prefect" in text and text.count("proxy_pass") == 1
    assert "proxy_ssl" not in text


def test_nginx_config_verifies_an_https_upstream_and_has_no_user_when_not_root():
    text = render_nginx(nginx_config(upstream_scheme="https", upstream_server="prefect.example:443"))
    assert "proxy_pass https://prefect;" in text and "proxy_ssl_verify on;" in text
    assert "\nuser " not in text


@pytest.mark.parametrize("url, parts", [
    ("http://127.0.0.1:4200/api", ("http", "127.0.0.1:4200")),
    ("http://127.0.0.1:4200/api/", ("http", "127.0.0.1:4200")),
    ("https://prefect.example/api", ("https", "prefect.example:443")),
    ("http://[::1]:4200/api", ("http", "[::1]:4200")),
])
def test_upstream_parts(url, parts):
    assert ticket_proxy.upstream_parts(url) == parts


@pytest.mark.parametrize("url", ["http://127.0.0.1:4200", "http://127.0.0.1:4200/prefect/api", "ftp://x/api"])
def test_upstream_parts_refuses_what_the_gate_cannot_front(url):
    with pytest.raises(ValueError, match="/api"):
        ticket_proxy.upstream_parts(url)


def test_listen_address_and_ticket_url(monkeypatch):
    for name in ("BOUWSTEEN_TICKET_LISTEN", "BOUWSTEEN_TICKET_URL"):
        monkeypatch.delenv(name, raising=False)
    assert ticket_proxy.listen_address(4200) == ("127.0.0.1", 4201)
    assert ticket_proxy.ticket_url(4210) == "http://127.0.0.1:4211/api"
    monkeypatch.setenv("BOUWSTEEN_TICKET_LISTEN", "0.0.0.0:8443")
    assert ticket_proxy.listen_address(4200) == ("0.0.0.0", 8443)
    assert ticket_proxy.ticket_url(4200) == "http://127.0.0.1:8443/api"
    assert ticket_proxy.listen_directive("::1", 4201) == "[::1]:4201"
    monkeypatch.setenv("BOUWSTEEN_TICKET_URL", "https://tickets.example/api/")
    assert ticket_proxy.ticket_url(4200) == "https://tickets.example/api"
    monkeypatch.setenv("BOUWSTEEN_TICKET_LISTEN", "8443")
    with pytest.raises(ValueError, match="ADDRESS:PORT"):
        ticket_proxy.listen_address(4200)


# ---------------------------------------------------------------------------------------------
# The gate in nginx: a stub Prefect records what reaches it


LAB = "0b9c5a6e-1111-4222-8333-444455556666"
PROD = "0b9c5a6e-1111-4222-8333-777788889999"
RUN = "5f0e8d7c-aaaa-4bbb-8ccc-ddddeeeeffff"
ADMIN = "admin:admin-password"
TICKET = ("ticket", "ticket-password")
GATE_POLICY = policy([Allowed(LAB, "switchover/lab", "lab", ("candidate", "cluster", "dry_run")),
                      Allowed(PROD, "switchover/prod", "prod", ("candidate", "cluster", "dry_run"))])


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Prefect(BaseHTTPRequestHandler):
    """Answers 200 with what it received."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        record = {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
                  "content_type": self.headers.get("Content-Type"), "body": body}
        _Prefect.seen.append(record)
        out = json.dumps(record).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

    def address_string(self):
        return "stub"

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def gate():
    if not (Path(ticket_proxy.NGINX).exists() and Path(ticket_proxy.NJS_MODULE).exists()):
        pytest.skip(f"nginx with njs not installed: {ticket_proxy.APT_HINT}")
    directory = Path(tempfile.mkdtemp(prefix="bouwsteen-gate-"))
    (directory / "tmp").mkdir()
    upstream = _UnixServer(str(directory / "prefect.sock"), _Prefect)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    (directory / "ticket_gate.js").write_text(render_gate(
        GATE_POLICY, user=TICKET[0], salt="salt", password_sha256=password_digest(TICKET[1], "salt"),
        source=ticket_proxy.GATE_SOURCE.read_text()))
    listen = directory / "gate.sock"
    (directory / "nginx.conf").write_text(render_nginx(NginxConfig(
        directory=directory, listen=f"unix:{listen}", upstream_server=f"unix:{directory / 'prefect.sock'}",
        admin_auth=ADMIN, worker_user="root" if os.geteuid() == 0 else None)))
    proc = subprocess.Popen([ticket_proxy.NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"),
                             "-e", str(directory / "error.log")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not listen.exists():
        assert proc.poll() is None, (directory / "error.log").read_text()
        assert time.monotonic() < deadline, "nginx did not listen"
        time.sleep(0.02)
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(listen)), base_url="http://tickets", timeout=10)
    yield client, listen, directory
    client.close()
    proc.terminate()
    proc.wait(timeout=10)
    upstream.shutdown()
    upstream.server_close()
    shutil.rmtree(directory, ignore_errors=True)


def ask(gate, method: str, path: str, body=None, auth=TICKET, raw: str | None = None,
        content_type: str = "application/json") -> tuple[int, dict | None]:
    """(status, what Prefect received or None); a refusal's detail is under "detail"."""
    client = gate[0]
    _Prefect.seen.clear()
    content = raw if raw is not None else (json.dumps(body) if body is not None else None)
    response = client.request(method, path, content=content, auth=auth,
                              headers={"Content-Type": content_type} if content is not None else {})
    if _Prefect.seen:
        return response.status_code, _Prefect.seen[-1]
    return response.status_code, {"detail": response.json()["detail"]} if response.content else None


RUN_BODY = {"parameters": {"candidate": "pg2", "cluster": "lab"}, "tags": ["ticket:CHG-4711"], "idempotency_key": "CHG-4711"}

PASSED = [
    ("GET", "/api/deployments/name/switchover/lab", None),
    ("POST", f"/api/deployments/{LAB}/create_flow_run", RUN_BODY),
    ("POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": {}}),
    ("POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": {"dry_run": "maybe"}}),  # Prefect's 409
    ("POST", f"/api/deployments/{PROD}/create_flow_run", {"parameters": {"cluster": "prod"}}),
    ("GET", f"/api/flow_runs/{RUN}", None),
    ("POST", "/api/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["ticket:CHG-4711"]}}}),
    ("POST", "/api/flow_runs/filter", None),
    ("POST", "/api/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [RUN]}}}),
]


@pytest.mark.parametrize("method, path, body", PASSED)
def test_the_gate_passes_with_the_admin_credential_and_the_body_unchanged(gate, method, path, body):
    status, seen = ask(gate, method, path, body)
    assert status == 200, seen
    assert seen["method"] == method and seen["path"] == path
    assert seen["authorization"] == f"Basic {b64encode(ADMIN.encode()).decode()}"
    assert seen["body"] == (json.dumps(body) if body is not None else "")


REFUSED = [
    # what, method, path, body, status, named in the detail
    ("another deployment", "GET", "/api/deployments/name/check_hosts/lab", None, 403, "not open to tickets"),
    ("a deployment's id", "GET", f"/api/deployments/{LAB}", None, 403, "may only"),
    ("changing a deployment", "PATCH", f"/api/deployments/{LAB}", {"paused": True}, 403, "may only"),
    ("deleting a deployment", "DELETE", f"/api/deployments/{LAB}", None, 403, "may only"),
    ("creating a deployment", "POST", "/api/deployments/", {"name": "x"}, 403, "may only"),
    ("a deployment by name, not GET", "POST", "/api/deployments/name/switchover/lab", {}, 403, "may only"),
    ("a run of another deployment", "POST", f"/api/deployments/{RUN}/create_flow_run", {}, 403, "not open to tickets"),
    ("unknown parameter", "POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": {"candidat": "pg2"}},
     422, "switchover/lab has no parameter(s) candidat; it takes candidate, cluster, dry_run"),
    ("another cluster", "POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": {"cluster": "prod"}},
     403, 'parameters.cluster: "prod" is refused: switchover/lab runs on cluster "lab" only'),
    ("a cluster that is no name", "POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": {"cluster": 42}},
     403, "parameters.cluster: 42"),
    ("the prod deployment's cluster elsewhere", "POST", f"/api/deployments/{PROD}/create_flow_run",
     {"parameters": {"cluster": "lab"}}, 403, "parameters.cluster"),
    ("job variables", "POST", f"/api/deployments/{LAB}/create_flow_run", {"job_variables": {"command": "id"}},
     403, 'field "job_variables" may not be set'),
    ("schema check off", "POST", f"/api/deployments/{LAB}/create_flow_run", {"enforce_parameter_schema": False},
     403, "enforce_parameter_schema"),
    ("a state", "POST", f"/api/deployments/{LAB}/create_flow_run", {"state": {"type": "COMPLETED"}}, 403, '"state"'),
    ("another work queue", "POST", f"/api/deployments/{LAB}/create_flow_run", {"work_queue_name": "x"}, 403,
     "work_queue_name"),
    ("a parameter named __proto__", "POST", f"/api/deployments/{LAB}/create_flow_run",
     {"parameters": {"__proto__": {"cluster": "prod"}}}, 422, "has no parameter(s) __proto__"),
    ("parameters not an object", "POST", f"/api/deployments/{LAB}/create_flow_run", {"parameters": []}, 422,
     "parameters must be a JSON object"),
    ("a tag that is not a ticket's", "POST", f"/api/deployments/{LAB}/create_flow_run", {"tags": ["cluster:prod"]},
     422, '"cluster:prod" is not a "ticket:<id>" tag'),
    ("tags not a list", "POST", f"/api/deployments/{LAB}/create_flow_run", {"tags": "ticket:x"}, 422, "tags must be"),
    ("idempotency key not a string", "POST", f"/api/deployments/{LAB}/create_flow_run", {"idempotency_key": 1}, 422,
     "idempotency_key"),
    ("no body", "POST", f"/api/deployments/{LAB}/create_flow_run", None, 422, "body must be a JSON object"),
    ("a list for a body", "POST", f"/api/deployments/{LAB}/create_flow_run", [], 422, "body must be a JSON object"),
    ("changing a run's state", "POST", f"/api/flow_runs/{RUN}/set_state", {}, 403, "may only"),
    ("deleting a run", "DELETE", f"/api/flow_runs/{RUN}", None, 403, "may only"),
    ("a run by a name", "GET", "/api/flow_runs/some-name", None, 403, "may only"),
    ("reading a filter with GET", "GET", "/api/flow_runs/filter", None, 403, "may only"),
    ("block documents", "POST", "/api/block_documents/filter", {"include_secrets": True}, 403, "may only"),
    ("a block by name", "GET", "/api/block_types/slug/bouwsteen-ssh-credentials/block_documents/name/lab", None, 403,
     "may only"),
    ("variables", "POST", "/api/variables/filter", {}, 403, "may only"),
    ("a variable", "GET", "/api/variables/name/x", None, 403, "may only"),
    ("logs", "POST", "/api/logs/filter", {}, 403, "may only"),
    ("the UI's settings", "GET", "/ui-settings", None, 403, "may only"),
    ("a query string", "GET", f"/api/flow_runs/{RUN}?include_secrets=true", None, 403, "plain"),
    ("a percent-escape", "GET", "/api/deployments/name/switchover%2Flab", None, 403, "plain"),
    ("HEAD", "HEAD", "/api/deployments/name/switchover/lab", None, 403, None),
]


@pytest.mark.parametrize("what, method, path, body, status, named", REFUSED, ids=[r[0] for r in REFUSED])
def test_the_gate_refuses_naming_the_reason(gate, what, method, path, body, status, named):
    got, seen = ask(gate, method, path, body)
    assert got == status, seen
    if named:
        assert named in seen["detail"], seen
    assert not _Prefect.seen, "a refused request reached Prefect"


def test_the_gate_refuses_bodies_that_are_not_json_or_too_large(gate):
    assert ask(gate, "POST", f"/api/deployments/{LAB}/create_flow_run", raw="{nope")[0] == 400
    assert ask(gate, "POST", "/api/flow_runs/filter", raw="[1]")[0] == 422
    big = json.dumps({"parameters": {"candidate": "x" * (ticket_proxy.BODY_LIMIT + 1)}})
    assert ask(gate, "POST", f"/api/deployments/{LAB}/create_flow_run", raw=big) == (
        413, {"detail": f"the body is larger than {ticket_proxy.BODY_LIMIT} bytes"})
    assert not _Prefect.seen


def test_prefect_reads_the_body_as_the_json_the_gate_checked(gate):
    """curl -d sends a form content type; Prefect must not read the body as anything but JSON."""
    status, seen = ask(gate, "POST", f"/api/deployments/{LAB}/create_flow_run", RUN_BODY,
                       content_type="application/x-www-form-urlencoded")
    assert status == 200 and seen["content_type"] == "application/json"
    assert json.loads(seen["body"]) == RUN_BODY


@pytest.mark.parametrize("auth", [None, tuple(ADMIN.split(":")), (TICKET[0], "wrong"), ("admin", TICKET[1])])
def test_only_the_ticket_credential_is_taken(gate, auth):
    status, seen = ask(gate, "GET", "/api/deployments/name/switchover/lab", auth=auth)
    assert status == 401 and "ticket credential" in seen["detail"]


def test_health_needs_no_credential_and_the_allow_list_is_readable_with_it(gate):
    assert ask(gate, "GET", "/api/health", auth=None)[0] == 200
    response = gate[0].get("/bouwsteen/allow-list", auth=TICKET)
    assert response.status_code == 200 and response.json() == GATE_POLICY


@pytest.mark.parametrize("path", ["/api/block_documents/../flow_runs/" + RUN, "//api/flow_runs/" + RUN,
                                  "/api/./flow_runs/" + RUN])
def test_what_the_gate_matched_is_what_prefect_would_receive(gate, path):
    """Dot segments and double slashes (sent as is: httpx would resolve them) are refused."""
    listen = gate[1]
    token = b64encode(":".join(TICKET).encode()).decode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(listen))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: tickets\r\nAuthorization: Basic {token}\r\n"
                  f"Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.split(b" ")[1] == b"403" and b"plain" in answer, answer
