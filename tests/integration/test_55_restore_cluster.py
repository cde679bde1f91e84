"""restore_cluster (issue 17) on the routed lab: marker rows, a table dropped at T, and the whole
cluster put back to just before T — standbys cloned again, routing through the VIP, a fresh
backup of the new timeline; an unconfirmed run changes nothing."""

from __future__ import annotations

import shlex
import time

from labtools import host_state_digest, lab_ssh, refused

PSQL = "runuser -u postgres -- psql -XAt -v ON_ERROR_STOP=1 -h /var/run/postgresql -c "


def _sql(lab, host: str, sql: str) -> str:
    return lab_ssh(lab, host, PSQL + shlex.quote(sql)).stdout.strip()


def _marked(lab, host: str, note: str, count: int) -> None:
    for _ in range(count):
        _sql(lab, host, f"insert into bouwsteen.restore_marker (note) values ('{note}')")


def _archived_now(lab, host: str, deadline_s: float = 120) -> None:
    """The segment holding T archived, so a drill can recover to it (restore_cluster does this itself)."""
    segment = _sql(lab, host, "select pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + deadline_s
    while (_sql(lab, host, "select coalesce(last_archived_wal, '') from pg_stat_archiver")[8:] or "") < segment[8:]:
        assert time.monotonic() < deadline, f"{segment} not archived after {deadline_s}s"
        time.sleep(0.5)


def test_restore_cluster_to_just_before_a_drop(lab, backed_up, routed):
    from flows.basebackup import scheduled_basebackup
    from flows.restore_cluster import restore_cluster
    from flows.restore_drill import restore_drill
    from tasks.context import context_for
    from tasks.ha import primary_of

    # A backup before T, so the restore has one to start from (the newest that finished before it).
    assert scheduled_basebackup(cluster="lab", force=True)["ran"]
    primary = primary_of(context_for("lab", fresh=True)).name
    _sql(lab, primary, "create schema if not exists bouwsteen")
    _sql(lab, primary, "create table if not exists bouwsteen.restore_marker (id bigserial primary key, "
                       "written_at timestamptz not null default clock_timestamp(), note text)")
    _sql(lab, primary, "drop table if exists public.orders; create table public.orders (id int primary key)")
    _sql(lab, primary, "insert into public.orders select generate_series(1, 1000)")
    _marked(lab, primary, "before T", 3)
    before = _sql(lab, primary, "select string_agg(id::text, ',' order by id) from bouwsteen.restore_marker")
    time.sleep(1)  # T falls strictly between the last row before it and the first after it
    target = _sql(lab, primary, "select to_char(clock_timestamp() at time zone 'UTC', "
                                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')")
    time.sleep(1)
    _marked(lab, primary, "after T", 2)
    _sql(lab, primary, "drop table public.orders")  # the migration's mistake at T

    plan = restore_cluster(cluster="lab", target=target, dry_run=True)
    assert plan["changed"] is False and plan["plan"], plan
    digests = {h: host_state_digest(lab, h) for h in ("pg1", "pg2", "pg3")}
    refused(restore_cluster(cluster="lab", target=target, confirm_cluster="lab", confirm_target="now",
                            return_state=True), "confirm_target")
    refused(restore_cluster(cluster="lab", target="tomorrow", confirm_cluster="lab", confirm_target="tomorrow",
                            return_state=True), "target:")
    assert {h: host_state_digest(lab, h) for h in digests} == digests, "a refused restore changed a host"

    # The raw restore and recovery of the same backup to the same target, for the benchmark's ratio.
    _archived_now(lab, primary)
    drill = restore_drill(cluster="lab", target=target)
    done = restore_cluster(cluster="lab", target=target, confirm_cluster="lab", confirm_target=target)
    assert done["changed"] and done["backup"] == drill["backup"], (done, drill)

    new_primary = done["primary"]
    assert _sql(lab, new_primary, "select string_agg(id::text, ',' order by id) from bouwsteen.restore_marker") \
        == before, "the rows committed before T are not exactly those back"
    assert _sql(lab, new_primary, "select count(*) from public.orders") == "1000", "the dropped table is not back"
    hosts = {r["host"] for r in done["topology"] if str(r["state"]).startswith("streaming")}
    members = {h.name for h in context_for("lab", fresh=True).inventory.db_hosts}
    assert hosts == members - {new_primary}, done["topology"]
    assert lab_ssh(lab, new_primary, "ls -d /var/lib/postgresql/15/main.pre-restore-*", check=False).returncode != 0, \
        "the kept-aside copy outlived the verified restore"
    # The restored cluster takes writes and archives them on its new timeline.
    _marked(lab, new_primary, "after the restore", 1)
    print(f"restore_cluster: writable after {done['writable_s']}s, every standby streaming after "
          f"{done['all_streaming_s']}s; the drill's raw restore + recovery {drill['ready_s']}s; "
          f"ratio {done['writable_s'] / drill['ready_s']:.2f}")
