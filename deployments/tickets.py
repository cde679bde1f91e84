"""What a ticketing system does to start and follow a bouwsteen run: plain REST calls, no Prefect client.

Kept deliberately thin: every function is one documented call of deployments/TICKETS.md, so the
CLI (`bouwsteen ticket ...`) and the tests exercise exactly the contract a ticket system uses.
They go to the ticket proxy (deployments/ticket_proxy.py) with the ticket credential, as a ticket
system does: $BOUWSTEEN_TICKET_URL and $BOUWSTEEN_TICKET_AUTH (`user:password`), else this
controller's proxy and `<PREFECT_HOME>/auth/ticket-auth`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import httpx

from tasks.errors import BouwsteenError

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class TicketError(BouwsteenError):
    """The server refused the request; the message carries its status and detail."""


def api_url() -> str:
    from deployments.ticket_proxy import ticket_url

    return ticket_url()


def ticket_auth() -> str:
    """The ticket credential, `user:password`."""
    explicit = os.environ.get("BOUWSTEEN_TICKET_AUTH")
    if explicit:
        return explicit
    from deployments.credentials import ticket_auth_string
    from deployments.server import prefect_home

    try:
        found = ticket_auth_string(prefect_home(), create=False)
    except PermissionError:
        found = None
    if not found:
        raise TicketError(f"no ticket credential: set BOUWSTEEN_TICKET_AUTH=user:password, or run as a user who may "
                          f"read {prefect_home() / 'auth' / 'ticket-auth'}")
    return found


def _client(base_url: str | None = None, auth: str | None = None, timeout: float = 30) -> httpx.Client:
    user, _, password = (auth or ticket_auth()).partition(":")
    return httpx.Client(base_url=base_url or api_url(), auth=(user, password), timeout=timeout)


# Prefect answers 503 for errors it calls retryable (a busy database); gateways add 502/504, and a
# server under load may shed with 429. Every call here is a read or an idempotent create (the
# ticket id is the idempotency key), so repeating it after a pause is always safe.
RETRYABLE_STATUS = {429, 502, 503, 504}
RETRY_DELAYS = (0.5, 1, 2, 4, 8)


def _request(http: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response:
    for delay in (*RETRY_DELAYS, None):
        try:
            response = http.request(method, path, **kwargs)
        except httpx.TransportError:
            if delay is None:
                raise
        else:
            if response.status_code not in RETRYABLE_STATUS or delay is None:
                return response
        time.sleep(delay)
    raise AssertionError("unreachable")


def _check(response: httpx.Response, what: str) -> dict | list:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise TicketError(f"{what}: HTTP {response.status_code}: {detail}")
    return response.json()


def ticket_tag(ticket: str) -> str:
    return f"ticket:{ticket}"


def find_deployment(flow: str, deployment: str, *, base_url: str | None = None, auth: str | None = None) -> dict:
    """GET /api/deployments/name/{flow}/{deployment}"""
    with _client(base_url, auth) as http:
        return _check(_request(http, "GET", f"/deployments/name/{flow}/{deployment}"), f"deployment {flow}/{deployment}")


@dataclass
class CreatedRun:
    id: str
    name: str
    state: str
    created: bool  # False: an earlier request with this ticket id already made the run (HTTP 200, not 201)
    body: dict


def create_run(deployment_id: str, ticket: str, parameters: dict | None = None, *,
               base_url: str | None = None, auth: str | None = None) -> CreatedRun:
    """POST /api/deployments/{id}/create_flow_run, the ticket id as tag and idempotency key."""
    payload = {"parameters": parameters or {}, "tags": [ticket_tag(ticket)], "idempotency_key": ticket}
    with _client(base_url, auth) as http:
        response = _request(http, "POST", f"/deployments/{deployment_id}/create_flow_run", json=payload)
    body = _check(response, f"create run for ticket {ticket}")
    return CreatedRun(id=body["id"], name=body["name"], state=body["state"]["type"],
                      created=response.status_code == 201, body=body)


def read_run(run_id: str, *, base_url: str | None = None, auth: str | None = None) -> dict:
    """GET /api/flow_runs/{id}"""
    with _client(base_url, auth) as http:
        return _check(_request(http, "GET", f"/flow_runs/{run_id}"), f"flow run {run_id}")


def wait_for_run(run_id: str, *, timeout: float = 900, poll: float = 2, base_url: str | None = None,
                 auth: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = read_run(run_id, base_url=base_url, auth=auth)
        if run["state"] and run["state"]["type"] in FINAL_STATES:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {run_id} still {run['state']['name']} after {timeout:.0f}s")
        time.sleep(poll)


def read_artifacts(run_id: str, *, base_url: str | None = None, auth: str | None = None) -> list[dict]:
    """POST /api/artifacts/filter for the run's artifacts (the report tables), oldest first."""
    payload = {"artifacts": {"flow_run_id": {"any_": [run_id]}}, "sort": "CREATED_DESC"}
    with _client(base_url, auth) as http:
        newest_first = _check(_request(http, "POST", "/artifacts/filter", json=payload), f"artifacts of flow run {run_id}")
    return list(reversed(newest_first))


def unknown_parameters(deployment: dict, parameters: dict) -> set[str]:
    """The server checks types but accepts names the flow does not take (the run would then crash);
    the ticket proxy refuses them (422), and `bouwsteen ticket run` before it sends anything."""
    return set(parameters) - set((deployment.get("parameter_openapi_schema") or {}).get("properties", {}))
