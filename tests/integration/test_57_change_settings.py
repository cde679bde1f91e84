"""change_settings (issue 18) on the routed lab: bad input refused with nothing changed, a
reload-only change (work_mem), and a change that needs a restart (shared_buffers) rolled through
every member with one switchover; each run a second time changes nothing."""

from __future__ import annotations

import shlex

from labtools import cluster_state_digest, lab_ssh, refused

SHOW_CONFIG = "runuser -u postgres -- patronictl -c /etc/patroni/config.yml show-config lab"


def _show(lab, host: str, name: str) -> str:
    sql = f"select setting || '|' || coalesce(unit, '') || '|' || pending_restart from pg_settings where name = '{name}'"
    return lab_ssh(lab, host, "runuser -u postgres -- psql -XAt -h /var/run/postgresql -c "
                   + shlex.quote(sql)).stdout.strip()


def _members():
    from tasks.context import context_for

    return [h.name for h in context_for("lab", fresh=True).inventory.db_hosts]


def test_bad_settings_are_refused_before_anything_changes(lab, routed):
    from flows.settings import change_settings

    members = _members()
    before = cluster_state_digest(lab, members)
    config = lab_ssh(lab, members[0], SHOW_CONFIG).stdout
    refused(change_settings(cluster="lab", parameters={"work_mem": "64XB", "shared_bufers": "1GB",
                                                       "max_connections": "0"}, return_state=True),
            "parameters.work_mem:", "parameters.shared_bufers: PostgreSQL has no such parameter; did you mean "
            "shared_buffers?", "parameters.max_connections: '0' is 0, outside 1 ..")
    refused(change_settings(cluster="lab", parameters={"port": "6543"}, return_state=True),
            "parameters.port: set by the HA manager itself")
    refused(change_settings(cluster="lab", parameters={"wal_level": "logical"}, return_state=True),
            "parameters.wal_level: bouwsteen sets it to 'replica'")
    refused(change_settings(cluster="lab", parameters={"log_line_prefix": "%m\nbad = 1"}, return_state=True),
            "parameters.log_line_prefix:", "control character")
    assert cluster_state_digest(lab, members) == before, "a refused change touched a host"
    assert lab_ssh(lab, members[0], SHOW_CONFIG).stdout == config, "a refused change wrote the HA configuration"


def test_a_reload_only_change_restarts_nothing(lab, routed):
    from flows.settings import change_settings

    plan = change_settings(cluster="lab", parameters={"work_mem": "48MB"}, dry_run=True)
    assert plan["changed"] is False and [c["needs"] for c in plan["changes"]] == ["reload"], plan
    done = change_settings(cluster="lab", parameters={"work_mem": "48MB"})
    assert done["changed"] and done["restarted"] == [] and done["switchover"] is None, done
    assert {r["host"]: r["work_mem"] for r in done["members"]} == dict.fromkeys(_members(), "49152"), done["members"]
    again = change_settings(cluster="lab", parameters={"work_mem": "48MB"})
    assert again["changed"] is False, again


def test_a_restart_change_rolls_through_every_member_with_one_switchover(lab, routed):
    from flows.settings import change_settings
    from tasks.context import context_for
    from tasks.ha import primary_of

    members = _members()
    primary = primary_of(context_for("lab", fresh=True)).name
    done = change_settings(cluster="lab", parameters={"shared_buffers": "144MB"})
    assert done["changed"], done
    # The standbys one by one; the old primary came back with the new value from its demotion.
    assert sorted(done["restarted"]) == sorted(set(members) - {primary}), done["timeline"]
    assert done["restarted"][-1] == done["switchover"], "the switchover's target is restarted last of the standbys"
    assert done["switchover"] not in (None, primary), done["timeline"]
    assert [e["event"] for e in done["timeline"]].count(f"switchover {primary} → {done['switchover']}") == 1
    assert {h: _show(lab, h, "shared_buffers") for h in members} == dict.fromkeys(members, "18432|8kB|false")
    again = change_settings(cluster="lab", parameters={"shared_buffers": "144MB"})
    assert again["changed"] is False, again
