"""`bouwsteen lab up | down | status [--json] | ssh HOST [CMD...] | stop | start | kill | isolate | heal HOST`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lab.machine import LabError
from lab.manager import Lab


def add_parser(subparsers) -> None:
    lab = subparsers.add_parser("lab", help="the lab of real hosts on this machine")
    sub = lab.add_subparsers(dest="lab_command", required=True)
    sub.add_parser("up", help="build the image if needed and boot every lab host (idempotent)")
    sub.add_parser("down", help="power off every lab host and remove all traces")
    status = sub.add_parser("status", help="state of each lab host")
    status.add_argument("--json", action="store_true")
    ssh = sub.add_parser("ssh", help="open a shell or run a command on a lab host")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)
    for name, text in (
        ("stop", "power a host off (its address stops answering)"),
        ("start", "power a host on"),
        ("kill", "pull a host's plug: no orderly shutdown"),
        ("isolate", "cut a host's network"),
        ("heal", "restore a host's network"),
    ):
        sub.add_parser(name, help=text).add_argument("host")
    lab.set_defaults(handler=handle)


def handle(args) -> int:
    lab = Lab()
    try:
        if args.lab_command == "up":
            summary = lab.up(pip=_venv_pip())
            for name, state in summary["hosts"].items():
                print(f"{name:10s} {state}")
            print(
                f"lab up: image {summary['image_seconds']}s, boot {summary['boot_seconds']}s; "
                f"inventory {summary['inventory']}"
            )
            return 0
        if args.lab_command == "down":
            lab.down()
            print("lab down: hosts powered off, namespaces, links, bridge and disks removed")
            return 0
        if args.lab_command == "status":
            rows = lab.status_dicts()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for row in rows:
                    print(f"{row['name']:10s} {row['address']:15s} {row['state']:9s} ssh={'yes' if row['ssh'] else 'no'}")
            return 0
        if args.lab_command == "ssh":
            from lab.topology import host_by_name

            argv = lab.ssh_argv(host_by_name(args.host))
            if args.cmd:
                argv += ["--", *args.cmd]
            else:
                argv.insert(1, "-t")
            os.execvp(argv[0], argv)
        getattr(lab, args.lab_command)(args.host)
        print(f"{args.host}: {args.lab_command} done")
        return 0
    except (LabError, KeyError) as exc:
        print(f"lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1


def _venv_pip() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "pip")
    return candidate if os.path.exists(candidate) else "pip3"
