"""Backup server, nightly base backup and restore drills on the lab (pgBackRest against rclone S3/TLS)."""

from __future__ import annotations

import re
import threading
import time

import pytest
from labtools import cluster_state_digest, lab_ssh


def primary_pg(ctx):
    from tasks.adapters.postgres import Postgres
    from tasks.ha import primary_of

    return Postgres(ctx.superuser_endpoint(primary_of(ctx)))


def bucket_keys(ctx) -> set[str]:
    from tasks.adapters.s3 import ObjectStore
    from tasks.backup import store_endpoint

    with ObjectStore(store_endpoint(ctx)) as s3:
        return set(s3.keys(ctx.inventory.cluster.object_store.bucket, "lab/"))


def test_backup_server_rollout_and_rerun_is_noop(lab, registered):
    from flows.backup_server import backup_server_rollout

    state = backup_server_rollout(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    again = backup_server_rollout(cluster="lab", return_state=True)
    assert again.is_completed(), again.message
    assert again.result()["changed"] is False
    # Objects are plain files under the data path the site's file-level backup picks up.
    listing = lab_ssh(lab, "backup1", "find /srv/s3/bouwsteen -maxdepth 2 | sort").stdout
    assert "/srv/s3/bouwsteen/lab" in listing
    mode = lab_ssh(lab, "backup1", "stat -c '%a %U' /etc/bouwsteen-s3/credentials.env /etc/bouwsteen-s3/tls.key").stdout
    assert mode.split() == ["600", "root", "600", "bouwsteen-s3"]


def test_build_cluster_turns_archiving_on(lab, object_store):
    from flows.build_cluster import build_cluster
    from tasks.context import context_for

    state = build_cluster(cluster="lab", return_state=True)
    assert state.is_completed(), state.message
    ctx = context_for("lab", fresh=True)
    with primary_pg(ctx) as pg:
        segment = pg.scalar("select pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while (pg.scalar("select last_archived_wal from pg_stat_archiver") or "")[8:] < segment[8:]:
            assert time.monotonic() < deadline, "WAL is not being archived"
            time.sleep(0.5)


def test_nightly_backup_from_a_standby_then_skip_then_retention(lab, archiving):
    from flows.basebackup import scheduled_basebackup

    first = scheduled_basebackup(cluster="lab", return_state=True)
    assert first.is_completed(), first.message
    report = first.result()
    assert report["ran"] is True
    assert report["backup"]["host"] != "pg1" and report["backup"]["host"] in ("pg2", "pg3", "pg4")

    second = scheduled_basebackup(cluster="lab", return_state=True)
    assert second.is_completed(), second.message
    assert second.result()["ran"] is False and "skip window" in second.result()["decision"]

    for _ in range(2):
        forced = scheduled_basebackup(cluster="lab", force=True, kind="full", keep_full=2, return_state=True)
        assert forced.is_completed(), forced.message
    assert len(forced.result()["kept"]) == 2


def test_incremental_after_changes_then_a_drill_from_it_and_retention_by_chain(lab, backed_up):
    """A full, a day's change, then the night's incremental (block incremental: it stores the
    change, not the database again); a point-in-time drill from the incremental with the marker
    check; and retention that expires a full takes its incrementals with it."""
    from flows.basebackup import scheduled_basebackup
    from flows.restore_drill import restore_drill
    from tasks.context import context_for
    from tasks.restore import ensure_drill_torn_down

    full = scheduled_basebackup(cluster="lab", force=True, kind="full")["backup"]
    assert full["kind"] == "full", full
    ctx = context_for("lab", fresh=True)
    with primary_pg(ctx) as pg:
        pg.query("create table if not exists public.orders_day (id bigserial primary key, note text)")
        pg.query("insert into public.orders_day (note) select 'new order ' || i from generate_series(1, 2000) i")
    # No full night in the schedule: the run makes what a weeknight makes.
    report = scheduled_basebackup(cluster="lab", force=True, full_on=[])
    incr = report["backup"]
    assert incr["kind"] == "incr" and incr["name"].startswith(full["name"] + "_"), incr
    assert f"on full backup {full['name']}" in incr["based_on"]
    assert incr["stored_mib"] < full["stored_mib"], (incr, full)
    try:
        drill = restore_drill(cluster="lab", backup=incr["name"], target="latest", keep=True, replace_kept=True)
        assert drill["backup"] == incr["name"], drill
        count = lab_ssh(lab, "restore1", "runuser -u postgres -- psql -X -At -h /var/run/postgresql "
                                         "-c 'select count(*) from public.orders_day'").stdout.strip()
        assert int(count) >= 2000, count
    finally:
        ensure_drill_torn_down("lab")
    # Another full with only one kept: the older full goes, and its incremental with it.
    kept = scheduled_basebackup(cluster="lab", force=True, kind="full", keep_full=1)
    assert kept["kept"] == [kept["backup"]["name"]], kept["kept"]


def test_freshness_alarm_fails_loudly(lab, backed_up):
    from flows.basebackup import BackupTooOld, scheduled_basebackup

    # A freshness limit shorter than the newest backup's age: the run must fail even though it skips.
    state = scheduled_basebackup(cluster="lab", freshness_limit_hours=0.0001, return_state=True)
    assert state.is_failed()
    with pytest.raises(BackupTooOld):
        state.result()


def test_point_in_time_restore_drill(lab, backed_up):
    from flows.restore_drill import restore_drill
    from tasks.context import context_for
    from tasks.restore import ensure_drill_torn_down

    ctx = context_for("lab", fresh=True)
    with primary_pg(ctx) as pg:
        pg.query("create table if not exists public.pitr_check (label text primary key, "
                 "at timestamptz not null default clock_timestamp())")
        pg.query("delete from public.pitr_check")
        pg.query("insert into public.pitr_check (label) values ('A')")
        time.sleep(1.0)
        target = pg.scalar("select clock_timestamp()")
        time.sleep(1.0)
        pg.query("insert into public.pitr_check (label) values ('B')")
        segment = pg.scalar("select pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + 60
        while (pg.scalar("select last_archived_wal from pg_stat_archiver") or "")[8:] < segment[8:]:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    timeline = int(segment[:8], 16)
    keys_before = bucket_keys(ctx)

    def labels() -> list[str]:
        out = lab_ssh(lab, "restore1", "runuser -u postgres -- psql -X -At -h /var/run/postgresql "
                                       "-c 'select label from public.pitr_check order by 1'").stdout
        return out.split()

    try:
        state = restore_drill(cluster="lab", target=target.isoformat(), keep=True, replace_kept=True,
                              return_state=True)
        assert state.is_completed(), state.message
        assert labels() == ["A"]
        row = state.result()
        assert row["seconds_before_target"] is not None and row["seconds_before_target"] >= 0

        state = restore_drill(cluster="lab", target="latest", keep=True, replace_kept=True, return_state=True)
        assert state.is_completed(), state.message
        assert labels() == ["A", "B"]
        assert lab_ssh(lab, "restore1", "ss -Hltn | awk '{print $4}'").stdout.split().count("127.0.0.1:5432") == 1
        assert "172.29.66.41:5432" not in lab_ssh(lab, "restore1", "ss -Hltn").stdout
    finally:
        ensure_drill_torn_down("lab")

    # Whatever the drill did, it wrote nothing to the bucket: the only new objects are the
    # cluster's own WAL on its own timeline (a promoted drill copy would push a higher one).
    new = bucket_keys(ctx) - keys_before
    foreign = [k for k in new if not re.search(rf"/{timeline:08X}[0-9A-F]{{16}}-[0-9a-f]+(\.[a-z0-9]+)?$", k)]
    assert foreign == [], foreign


@pytest.mark.parametrize("target, needle", [
    ("2999-01-01T00:00:00+00:00", "is in the future"),
    ("2001-01-01T00:00:00+00:00", "precedes the oldest backup"),
    ("yesterday", "neither 'latest' nor an ISO-8601 time"),
    ("2026-11-27T10:00:00", "has no time zone"),
])
def test_restore_drill_bad_targets_are_refused(lab, backed_up, target, needle):
    from flows.restore_drill import restore_drill

    before = cluster_state_digest(lab, ("restore1",))
    state = restore_drill(cluster="lab", target=target, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=re.escape(needle)):
        state.result()
    assert cluster_state_digest(lab, ("restore1",)) == before


# pgBackRest's own backup process: its command line starts with the program (wrappers such as
# timeout and runuser start with theirs), and it is the oldest of its name (its local workers and
# the ssh it forks come later, and a child caught between fork and exec would carry its line).
BACKUP_PROCESS = "^pgbackrest .*backup$"


def freeze_backup_when_it_starts(lab, host: str, seconds: int = 110) -> str | None:
    """SIGSTOP pgBackRest's backup on `host` the moment it exists: the backup is then certainly
    still running when the object store goes away, however fast this machine copies (within
    lab_ssh's own 120 s limit). Returns the pids to continue: the backup and its parent, runuser,
    which stops itself when its child stops (util-linux su) and resumes only on its own SIGCONT."""
    hunt = (f"timeout {seconds} bash --norc -c 'until pid=$(pgrep -o -f \"{BACKUP_PROCESS}\"); do sleep 0.05; done; "
            "kill -STOP $pid && echo $pid $(ps -o ppid= -p $pid)'")
    found = lab_ssh(lab, host, hunt, check=False)
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else None


def test_object_store_down_during_backup_fails_then_rerun_succeeds(lab, backed_up):
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from flows.basebackup import scheduled_basebackup
    from tasks.backup import is_backup_present
    from tasks.context import context_for
    from tasks.ha import primary_of

    ctx = context_for("lab", fresh=True)
    standbys = [h.name for h in ctx.inventory.db_hosts if h.name != primary_of(ctx).name]
    before = {b.name for b in is_backup_present("lab").backups}
    outcome: dict = {}
    frozen: dict[str, str] = {}
    with ThreadPoolExecutor(len(standbys)) as hunters:
        hunts = {hunters.submit(freeze_backup_when_it_starts, lab, host): host for host in standbys}
        runner = threading.Thread(target=lambda: outcome.setdefault(
            "state", scheduled_basebackup(cluster="lab", force=True, return_state=True)))
        runner.start()
        try:
            pending = set(hunts)
            while pending and not frozen:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                frozen.update({hunts[f]: f.result() for f in done if f.result()})
        finally:
            # No hunt may outlive this test: it would freeze the rerun's backup.
            for host in standbys:
                lab_ssh(lab, host, "pkill -f '[u]ntil pid=' || true", check=False)
    try:
        assert frozen, f"no backup process appeared on {standbys}"
        lab_ssh(lab, "backup1", "systemctl stop bouwsteen-s3")
        for host, pids in frozen.items():
            lab_ssh(lab, host, f"kill -CONT {pids}")
        runner.join(timeout=600)
        state = outcome["state"]
        assert state.is_failed(), "a backup whose object store vanished must not succeed"
    finally:
        for host, pids in frozen.items():
            lab_ssh(lab, host, f"kill -CONT {pids} 2>/dev/null || true", check=False)
        lab_ssh(lab, "backup1", "systemctl start bouwsteen-s3")
        runner.join(timeout=600)
    after = is_backup_present("lab").backups
    assert not [b for b in after if b.name not in before and not b.error], "no new backup may be reported good"

    rerun = scheduled_basebackup(cluster="lab", force=True, return_state=True)
    assert rerun.is_completed(), rerun.message
