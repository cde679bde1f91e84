"""The `bouwsteen` command: the lab, the Prefect server, blocks, and running flows from a shell."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flows.registry import FLOWS, load_flow
from lab import cli as lab_cli
from tasks.errors import PreflightRefused


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param {pair!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_run(args) -> int:
    from deployments.server import apply_environment, is_healthy, ui_url

    apply_environment()
    if not is_healthy():
        print("no Prefect server answers at PREFECT_API_URL; start one with `bouwsteen server start`", file=sys.stderr)
        return 2
    flow_fn = load_flow(args.flow)
    params = parse_params(args.param or [])
    if args.inventory:
        from blocks.inventory import InventoryError, load_inventory
        from blocks.register import register_block_types, save_inventory

        try:
            inventory = load_inventory(args.inventory)
        except InventoryError as exc:
            print(PreflightRefused(str(exc)), file=sys.stderr)
            return 2
        register_block_types()
        save_inventory(inventory)
        params.setdefault("cluster", inventory.cluster.name)
    elif args.cluster:
        params.setdefault("cluster", args.cluster)
    unknown = set(params) - set(flow_fn.parameters.properties)
    if unknown:
        print(PreflightRefused(f"{args.flow} has no parameter(s) {', '.join(sorted(unknown))}; "
                               f"it takes {', '.join(flow_fn.parameters.properties)}"), file=sys.stderr)
        return 2
    started = time.monotonic()
    state = flow_fn(**params, return_state=True)
    elapsed = time.monotonic() - started
    run_id = state.state_details.flow_run_id
    print(f"{args.flow}: {state.name} in {elapsed:.1f}s — {ui_url()}/runs/flow-run/{run_id}")
    if not state.is_completed():
        print(f"  {state.message}", file=sys.stderr)
        return 1
    return 0


def cmd_server(args) -> int:
    from deployments.server import apply_environment, start_server, stop_server, ui_url

    apply_environment()
    if args.server_command == "start":
        from deployments.credentials import ADMIN_FILE, auth_dir
        from deployments.server import prefect_home
        from deployments.ticket_proxy import ticket_url
        from tasks.errors import ServiceDidNotStart

        try:
            handle = start_server()
        except ServiceDidNotStart as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"Prefect server {'started' if handle.started else 'already running'}: {ui_url()} (API {handle.url})")
        print(f"  UI login: the auth string in {auth_dir(prefect_home()) / ADMIN_FILE} (user:password, as one line); "
              f"ticket proxy {ticket_url()}")
    elif args.server_command == "stop":
        print("Prefect server stopped" if stop_server() else "no Prefect server of ours was running")
    return 0


def cmd_blocks(args) -> int:
    from deployments.server import apply_environment

    apply_environment()
    from blocks.inventory import InventoryError
    from blocks.register import ClusterFiles, register_cluster

    if args.lab:
        from lab.paths import LabPaths

        files = ClusterFiles.for_lab(LabPaths.default().lab)
    else:
        missing = [n for n in ("inventory", "ssh_key", "known_hosts", "secrets") if not getattr(args, n)]
        if missing:
            print(f"blocks register: give --lab or all of {', '.join('--' + m.replace('_', '-') for m in missing)}",
                  file=sys.stderr)
            return 2
        files = ClusterFiles(
            inventory=Path(args.inventory), ssh_key=Path(args.ssh_key), known_hosts=Path(args.known_hosts),
            secrets=Path(args.secrets),
            ca_certificate=Path(args.ca_cert) if args.ca_cert else None,
            store_certificate=Path(args.store_cert) if args.store_cert else None,
            store_private_key=Path(args.store_key) if args.store_key else None,
            ca_private_key=Path(args.ca_key) if args.ca_key else None,
            ca_also_trusted=Path(args.ca_also_trusted) if args.ca_also_trusted else None,
        )
    try:
        inventory = register_cluster(files)
    except (InventoryError, ValueError) as exc:
        print(PreflightRefused(str(exc), nothing="saved"), file=sys.stderr)
        return 2
    print(f"blocks for cluster {inventory.cluster.name!r} registered (secrets stored as SecretStr)")
    return 0


def cmd_deploy(args) -> int:
    from deployments.server import apply_environment, is_healthy, ui_url

    apply_environment()
    if not is_healthy():
        print("no Prefect server answers at PREFECT_API_URL; start one with `bouwsteen server start`", file=sys.stderr)
        return 2
    from deployments.deploy import SCHEDULES, deploy_all

    result = deploy_all(args.cluster, notify_url=args.notify_url, schedules_active=not args.paused_schedules)
    for full_name in result.deployments:
        flow_name = full_name.split("/")[0]
        when = "; ".join(f"{s.cron} {s.parameters or ''}".strip() for s in SCHEDULES.get(flow_name, []))
        paused = " (paused)" if when and args.paused_schedules else ""
        print(f"  {full_name:<34} {when + ' Europe/Amsterdam' + paused if when else 'on demand'}")
    print(f"{len(result.deployments)} deployments on work pool {result.work_pool!r}; "
          f"failed/crashed runs notify {result.notify_url} — {ui_url()}/deployments")
    proxy = result.ticket_proxy
    if proxy is None:
        print("no ticket proxy runs beside this server: `bouwsteen ticket proxy start` starts one")
    else:
        print(f"ticket proxy {proxy.url}: {len(proxy.deployments)} deployments open to the ticket credential")
    return 0


def cmd_worker(args) -> int:
    from deployments.server import apply_environment, is_healthy
    from deployments.worker import start_worker, stop_worker

    apply_environment()
    if args.worker_command == "start":
        if not is_healthy():
            print("no Prefect server answers at PREFECT_API_URL; start one with `bouwsteen server start`",
                  file=sys.stderr)
            return 2
        handle = start_worker(args.name, limit=args.limit)
        print(f"worker {handle.name!r} {'started' if handle.started else 'already running'} "
              f"(pid {handle.pid}, pool bouwsteen, log {handle.log})")
    elif args.worker_command == "stop":
        from deployments.worker import worker_names

        for name in (worker_names() or [args.name]) if args.all else [args.name]:
            print(f"worker {name!r} stopped" if stop_worker(name) else f"no worker {name!r} was running")
    return 0


def _print_run(run: dict, artifacts: list[dict]) -> None:
    state = run["state"] or {}
    print(f"{run['id']}  {run['name']}  {state.get('name', '?')}  tags={','.join(sorted(run['tags']))}")
    if state.get("message"):
        print(f"  {state['message']}")
    for artifact in artifacts:
        if artifact["type"] is None:
            continue  # Prefect's own result records, not a report
        print(f"  artifact {artifact.get('key') or artifact['id']} ({artifact['type']}): "
              f"{artifact.get('description') or ''}".rstrip(": "))


def cmd_ticket(args) -> int:
    import httpx

    from deployments.server import apply_environment
    from deployments.tickets import (
        FINAL_STATES,
        TicketError,
        create_run,
        find_deployment,
        read_artifacts,
        read_run,
        unknown_parameters,
        wait_for_run,
    )

    apply_environment()
    if args.ticket_command == "proxy":
        return _ticket_proxy(args.action)
    try:
        if args.ticket_command == "status":
            run = read_run(args.run_id)
            _print_run(run, read_artifacts(args.run_id))
            return 0 if run["state"]["type"] == "COMPLETED" else 1 if run["state"]["type"] in FINAL_STATES else 3
        deployment = find_deployment(args.flow, args.deployment)
        params = parse_params(args.param or [])
        unknown = unknown_parameters(deployment, params)
        if unknown:
            print(PreflightRefused(f"{args.flow} has no parameter(s) {', '.join(sorted(unknown))}"), file=sys.stderr)
            return 2
        created = create_run(deployment["id"], args.ticket, params)
        print(f"ticket {args.ticket}: {'created' if created.created else 'already had'} flow run "
              f"{created.id} ({created.name}), {created.state}")
        if not args.wait:
            return 0
        run = wait_for_run(created.id, timeout=args.timeout)
        _print_run(run, read_artifacts(created.id))
        return 0 if run["state"]["type"] == "COMPLETED" else 1
    except TicketError as exc:
        print(exc, file=sys.stderr)
        return 2
    except httpx.TransportError as exc:
        from deployments.tickets import api_url

        print(f"cannot reach the ticket proxy at {api_url()}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(exc, file=sys.stderr)
        return 3


def _ticket_proxy(action: str) -> int:
    """The ticket proxy in front of PREFECT_API_URL (the local server, or a site's own)."""
    from urllib.parse import urlsplit

    from deployments import ticket_proxy
    from deployments.server import (
        DEFAULT_PORT,
        api_url,
        client_auth_string,
        prefect_home,
    )

    port = urlsplit(api_url()).port or DEFAULT_PORT
    if action == "stop":
        print("ticket proxy stopped" if ticket_proxy.stop(prefect_home()) else "no ticket proxy of ours was running")
        return 0
    auth = client_auth_string()
    if not auth:
        print("no admin auth string: set PREFECT_API_AUTH_STRING or start the server with `bouwsteen server start`",
              file=sys.stderr)
        return 2
    handle = ticket_proxy.ensure_running(prefect_home(), upstream=api_url(), admin_auth=auth,
                                         listen=ticket_proxy.listen_address(port))
    print(f"ticket proxy {handle.url} (pid {handle.pid}): {len(handle.deployments)} deployments open to the ticket "
          f"credential in {prefect_home() / 'auth' / 'ticket-auth'}")
    return 0


def cmd_demo(args) -> int:
    from deployments.demo import run_demo

    return run_demo(skip=set(args.skip or []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bouwsteen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lab_cli.add_parser(sub)

    run = sub.add_parser("run", help="run a flow against the configured Prefect server")
    run.add_argument("flow", choices=sorted(FLOWS))
    run.add_argument("--inventory", help="inventory YAML; validated and saved as the cluster's block first")
    run.add_argument("--cluster", help="name of a registered cluster (default: the flow's default)")
    run.add_argument("--param", action="append", metavar="KEY=VALUE", help="flow parameter; VALUE may be JSON")
    run.set_defaults(handler=cmd_run)

    server = sub.add_parser("server", help="the local Prefect server")
    server.add_argument("server_command", choices=["start", "stop"])
    server.set_defaults(handler=cmd_server)

    blocks = sub.add_parser("blocks", help="register a cluster's blocks (inventory, SSH, database, object store)")
    blocks.add_argument("blocks_command", choices=["register"])
    blocks.add_argument("--lab", action="store_true", help="the lab's files, written by `bouwsteen lab up`")
    blocks.add_argument("--inventory")
    blocks.add_argument("--ssh-key")
    blocks.add_argument("--known-hosts")
    blocks.add_argument("--secrets", help="JSON file with the passwords (root-only)")
    blocks.add_argument("--ca-cert")
    blocks.add_argument("--ca-key", help="the cluster's issuing CA key (cluster.tls); --ca-cert is its certificate")
    blocks.add_argument("--ca-also-trusted", help="PEM CA certificates trusted beside the issuing CA (a roll-over)")
    blocks.add_argument("--store-cert")
    blocks.add_argument("--store-key")
    blocks.set_defaults(handler=cmd_blocks)

    deploy = sub.add_parser("deploy", help="register the work pool, one deployment per flow, schedules and the "
                                           "failure notification")
    deploy.add_argument("--cluster", default="lab", help="cluster the deployments are for (their name)")
    deploy.add_argument("--notify-url", help="webhook for failed/crashed runs (default $BOUWSTEEN_NOTIFY_URL)")
    deploy.add_argument("--paused-schedules", action="store_true",
                        help="register the schedules inactive (a lab shared with others, tests)")
    deploy.set_defaults(handler=cmd_deploy)

    worker = sub.add_parser("worker", help="the process worker that runs deployments from this checkout")
    worker.add_argument("worker_command", choices=["start", "stop"])
    worker.add_argument("--name", default="bouwsteen-worker")
    worker.add_argument("--limit", type=int, help="at most this many flow runs at once")
    worker.add_argument("--all", action="store_true", help="stop: every worker started under this PREFECT_HOME")
    worker.set_defaults(handler=cmd_worker)

    ticket = sub.add_parser("ticket", help="start or follow a run the way a ticketing system does (REST)")
    ticket_sub = ticket.add_subparsers(dest="ticket_command", required=True)
    ticket_run = ticket_sub.add_parser("run", help="create a flow run of a deployment for a ticket (idempotent)")
    ticket_run.add_argument("flow", choices=sorted(FLOWS))
    ticket_run.add_argument("--deployment", required=True, help="deployment name, i.e. the cluster")
    ticket_run.add_argument("--ticket", required=True, help="ticket id: tag and idempotency key")
    ticket_run.add_argument("--param", action="append", metavar="KEY=VALUE", help="flow parameter; VALUE may be JSON")
    ticket_run.add_argument("--wait", action="store_true", help="poll until the run ends; print its artifacts")
    ticket_run.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits")
    ticket_status = ticket_sub.add_parser("status", help="state and artifacts of a flow run")
    ticket_status.add_argument("run_id")
    ticket_proxy = ticket_sub.add_parser("proxy", help="the ticket proxy, the only API entry of the ticket credential "
                                                       "(`bouwsteen server start` starts it beside the server)")
    ticket_proxy.add_argument("action", choices=["start", "stop"])
    ticket.set_defaults(handler=cmd_ticket)

    demo = sub.add_parser("demo", help="lab up, Prefect server, blocks, then every lifecycle flow")
    demo.add_argument("--skip", action="append", help="flow to leave out")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
