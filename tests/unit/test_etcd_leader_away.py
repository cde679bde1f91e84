"""tasks/programs/etcd_leader_away.py: the placement decision as a table, the gateway's shapes,
the callback's role filter, and the command/callback rendering. No etcd: the real thing runs in
the lab (build_cluster and the role-change flows call it on the primary)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Any

import pytest
import yaml

from blocks.inventory import parse_inventory
from tasks.adapters import etcd_config
from tasks.programs import etcd_leader_away as away
from tasks.programs.etcd_leader_away import (
    EtcdMemberState,
    main,
    parse_member_list,
    parse_status,
    plan_leader_move,
)
from tasks.adapters.ha.base import DbSecrets
from tasks.adapters.ha.patroni import PatroniDriver


def member(member_id: int, name: str, *, up: bool = True, index: int = 100, learner: bool = False) -> EtcdMemberState:
    return EtcdMemberState(member_id, name, (f"http://{name}:2379",), learner, up, index)


PG1, PG2, PG3 = member(1, "pg1"), member(2, "pg2", index=101), member(3, "pg3", index=99)


@pytest.mark.parametrize(
    ("members", "leader", "primary", "target", "failed", "reason"),
    [
        # the leader already elsewhere: nothing to do (the second run of every flow)
        ([PG1, PG2, PG3], 2, "pg1", None, False, "the etcd leader is pg2, not the primary's host pg1"),
        # on the primary's host: to the most caught-up healthy voter
        ([PG1, PG2, PG3], 1, "pg1", "pg2", False, "moving the etcd leader from the primary's host pg1 to pg2"),
        # equal progress: the name decides, so two runs agree
        ([PG1, member(2, "pg2", index=5), member(3, "pg3", index=5)], 1, "pg1", "pg3", False, "to pg3"),
        # an unreachable member or a learner is never chosen
        ([PG1, member(2, "pg2", up=False, index=500), PG3], 1, "pg1", "pg3", False, "to pg3"),
        ([PG1, member(2, "pg2", learner=True, index=500), PG3], 1, "pg1", "pg3", False, "to pg3"),
        # nobody to hand over to: reported as a failure, nothing attempted
        ([PG1, member(2, "pg2", up=False), member(3, "pg3", up=False)], 1, "pg1", None, True, "no other healthy voter"),
        # etcd on separate hosts: the primary's host runs no member
        ([member(7, "etcd1"), member(8, "etcd2")], 7, "pg1", None, False, "pg1 runs no etcd member"),
        # mid-election: leave etcd alone rather than add a transfer to it
        ([PG1, PG2, PG3], None, "pg1", None, False, "etcd has no leader right now"),
        ([PG1, PG2, PG3], 42, "pg1", None, False, "etcd has no leader right now"),
    ],
)
def test_plan_leader_move(members, leader, primary, target, failed, reason) -> None:
    move = plan_leader_move(members, leader, primary)
    assert (move.target.name if move.target else None) == target
    assert move.failed is failed
    assert reason in move.reason
    if target:
        assert move.source is not None and move.source.name == primary


def test_gateway_shapes_as_etcd_3_4_prints_them() -> None:
    # Recorded from the lab's etcd 3.4.23 JSON gateway: uint64 values arrive as strings.
    status = {"header": {"cluster_id": "7556663281321934179", "member_id": "11411397971630714036",
                         "revision": "123", "raft_term": "2"}, "version": "3.4.23", "dbSize": "65536",
              "leader": "13834645146808593192", "raftIndex": "145", "raftTerm": "2", "raftAppliedIndex": "145"}
    assert parse_status(status) == (11411397971630714036, 13834645146808593192, 145)
    assert parse_status({"header": {"member_id": "5"}, "leader": "0"}) == (5, None, 0)
    listed = {"header": {}, "members": [
        {"ID": "11411397971630714036", "name": "pg1", "peerURLs": ["http://10.0.0.11:2380"],
         "clientURLs": ["http://10.0.0.11:2379"]},
        {"ID": "42", "peerURLs": ["http://10.0.0.12:2380"], "isLearner": True},  # added, not started yet
    ]}
    assert parse_member_list(listed) == [
        {"member_id": 11411397971630714036, "name": "pg1", "client_urls": ("http://10.0.0.11:2379",), "learner": False},
        {"member_id": 42, "name": "", "client_urls": (), "learner": True},
    ]


@pytest.mark.parametrize("role", ["replica", "standby_leader", "demoted", "uninitialized"])
def test_callback_for_other_roles_touches_nothing(role: str, monkeypatch) -> None:
    def no_io(*_: Any) -> Any:
        raise AssertionError("no etcd request for a non-primary role")

    monkeypatch.setattr(away, "read_cluster", no_io)
    assert main(["--member", "pg1", "--endpoints", "http://x:2379", "on_role_change", role, "lab"]) == 0


def test_callback_as_primary_moves_and_says_so(monkeypatch, capsys) -> None:
    moved = []
    monkeypatch.setattr(away, "read_cluster", lambda endpoints: ([PG1, PG2, PG3], 1))
    monkeypatch.setattr(away, "move_leader", moved.append)
    assert main(["--member", "pg1", "--endpoints", "http://a:2379,http://b:2379", "on_role_change", "primary", "lab"]) == 0
    assert [m.target.name for m in moved] == ["pg2"]
    assert capsys.readouterr().out.strip() == "moving the etcd leader from the primary's host pg1 to pg2: done."


def test_etcd_unreachable_is_exit_1_with_a_reason(monkeypatch, capsys) -> None:
    def down(endpoints):
        raise ConnectionError("no etcd endpoint answered (http://a:2379)")

    monkeypatch.setattr(away, "read_cluster", down)
    assert main(["--member", "pg1", "--endpoints", "http://a:2379"]) == 1
    assert "no etcd endpoint answered" in capsys.readouterr().err


INV = parse_inventory({
    "cluster": {"name": "lab", "network": "10.0.0.0/24"},
    "hosts": [{"name": n, "address": a, "roles": ["db"]} for n, a in
              [("pg1", "10.0.0.11"), ("pg2", "10.0.0.12"), ("pg3", "10.0.0.13")]],
})


def test_command_and_patroni_callbacks_run_the_same_line() -> None:
    command = etcd_config.leader_away_command(INV, INV.host("pg2"))
    assert command.argv == ("python3", etcd_config.LEADER_AWAY_BIN, "--member", "pg2", "--endpoints",
                            "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379")
    assert command.ok_codes == (0, 1) and command.timeout <= 60
    secrets = DbSecrets(superuser="postgres", superuser_password="s", replication_user="replicator",
                        replication_password="r")
    text = PatroniDriver().render_config(INV, INV.host("pg2"), secrets, {})
    callbacks = yaml.safe_load(text)["postgresql"]["callbacks"]
    assert set(callbacks) == {"on_start", "on_role_change"}
    assert all(shlex.split(line) == list(command.argv) for line in callbacks.values())


def test_the_uploaded_file_runs_with_the_standard_library_alone(tmp_path) -> None:
    # Hosts get this file verbatim and run it with the system python3: no site-packages (-S), no
    # project on the path (-I, a copy outside the repository). It must still parse its arguments.
    file = etcd_config.leader_away_file()
    assert file.path == etcd_config.LEADER_AWAY_BIN and file.mode == 0o755 and not file.secret
    copy = tmp_path / "etcd_leader_away.py"
    copy.write_text(file.content)
    done = subprocess.run([sys.executable, "-I", "-S", str(copy), "--help"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "--member" in done.stdout
