"""Every figure in one run on the lab: `.venv/bin/python -m benchmarks.run` → benchmarks/REPORT.md.

Destructive for the lab: it starts from bare hosts (lab down/up) and kills hosts on purpose.
Ratios and medians are measured within this one run; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.chains import REPORT_ROWS as CHAIN_ROWS

OUT = Path(__file__).resolve().parent
PORT = 4220
HARD_FAILOVERS = 3  # the primary's host killed this many times; the median gap is reported
TLS_ROUNDS = 3  # switchovers and hard failovers per side of the TLS comparison
ROUNDS = 5  # interleaved backup/restore rounds; medians are compared
COMMAND = ".venv/bin/python -m benchmarks.run"
VIP = "172.29.66.100"


def log(text: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {text}", flush=True)


def setup_prefect() -> None:
    os.environ["BOUWSTEEN_PREFECT_HOME"] = str(Path(os.environ.get("BOUWSTEEN_HOME", "/var/lib/bouwsteen")) / "prefect-bench")
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{PORT}/api"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from deployments.server import apply_environment, start_server

    apply_environment(PORT)  # PREFECT_API_AUTH_STRING from prefect-bench/auth/admin-auth
    start_server(PORT, ticket_proxy=False)


def fresh_lab(lab) -> dict:
    from blocks.register import ClusterFiles, register_cluster

    lab.down()
    summary = lab.up(pip=str(Path(sys.executable).with_name("pip")))
    register_cluster(ClusterFiles.for_lab(lab.paths.lab))
    return summary


def ssh(lab, host: str, command: str, check: bool = True) -> str:
    from lab.topology import host_by_name

    result = subprocess.run(lab.ssh_argv(host_by_name(host)) + [command], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=3600)
    if check and result.returncode != 0:
        raise RuntimeError(f"{host}: {command}: {result.stderr.strip()[-300:]}")
    return result.stdout


def completed(state):
    if not state.is_completed():
        raise RuntimeError(f"flow failed: {state.message}")
    return state.result()


# ----------------------------------------------------------------------------- figures


def bench_image(results: dict) -> None:
    from lab.image import build_image
    from lab.paths import LabPaths

    scratch = Path(tempfile.mkdtemp(prefix="bouwsteen-image-bench-", dir="/var/tmp"))
    try:
        started = time.monotonic()
        build_image(LabPaths(scratch), force=True, pip=str(Path(sys.executable).with_name("pip")))
        results["image_build_s"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"image build: {results['image_build_s']}s")


def host_rss_mib(machine) -> float:
    total = 0
    for pid in machine.pids():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def bench_lab_up(lab, results: dict) -> None:
    lab.down()
    started = time.monotonic()
    summary = lab.up()
    results["lab_up_s"] = round(time.monotonic() - started, 1)
    time.sleep(5)
    rss = [host_rss_mib(m) for m in lab.machines()]
    results["idle_host_rss_mib"] = round(statistics.mean(rss), 1)
    results["lab_up_hosts"] = len(summary["hosts"])
    log(f"lab up: {results['lab_up_s']}s for {len(summary['hosts'])} hosts, {results['idle_host_rss_mib']} MiB RSS per idle host")


def bench_build(lab, results: dict) -> None:
    from benchmarks.plain_build import plain_build
    from flows.build_cluster import build_cluster

    fresh_lab(lab)
    results["plain_build_s"] = round(plain_build("lab"), 1)
    log(f"build as a plain script: {results['plain_build_s']}s")
    fresh_lab(lab)
    started = time.monotonic()
    completed(build_cluster(cluster="lab", return_state=True))
    results["build_cluster_s"] = round(time.monotonic() - started, 1)
    results["orchestration_overhead_ratio"] = round(results["build_cluster_s"] / results["plain_build_s"], 3)
    log(f"build_cluster flow: {results['build_cluster_s']}s; ratio {results['orchestration_overhead_ratio']}")


def setup_rest(results: dict) -> None:
    from flows.backup_server import backup_server_rollout
    from flows.build_cluster import build_cluster
    from flows.routing import routing_rollout

    completed(backup_server_rollout(cluster="lab", return_state=True))
    completed(build_cluster(cluster="lab", return_state=True))
    completed(routing_rollout(cluster="lab", return_state=True))


def enable_sync(on: bool) -> None:
    from blocks.inventory import Inventory
    from blocks.register import save_inventory
    from flows.build_cluster import build_cluster
    from tasks.context import context_for

    inv = context_for("lab", fresh=True).inventory
    doc = inv.model_dump(mode="json")
    doc["cluster"]["postgres"]["synchronous_replication"] = on
    save_inventory(Inventory.model_validate(doc))
    completed(build_cluster(cluster="lab", return_state=True))


def probe():
    from lab.avprobe import AvailabilityProbe
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    return AvailabilityProbe(ctx.application_endpoint(VIP, 5432), max_seconds=300)


# The same writes by three clients at once: through the VIP, through one database host's port to
# the primary, and as a multi-host libpq client (target_session_attrs=read-write).
CLIENTS = ("vip", "port", "multihost")


def client_probes(old_primary: str) -> dict:
    """`port` uses a database host other than the old primary, so a killed primary host does not
    take the client's own host with it."""
    from lab.avprobe import AvailabilityProbe
    from tasks.clients import multi_host_endpoint, primary_port_endpoint
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    host = next(h.name for h in ctx.inventory.db_hosts if h.name != old_primary)
    endpoints = {"vip": ctx.application_endpoint(VIP, 5432), "port": primary_port_endpoint(ctx, host),
                 "multihost": multi_host_endpoint(ctx)}
    return {name: AvailabilityProbe(endpoint, max_seconds=300) for name, endpoint in endpoints.items()}


def measure_clients(probes: dict) -> dict[str, tuple[float, int]]:
    """Per client: (longest write gap, acknowledged writes lost)."""
    reports = {name: p.stop() for name, p in probes.items()}
    return {name: (round(reports[name].longest_gap(), 2), len(probes[name].missing_acknowledged()))
            for name in probes}


def primary() -> str:
    from tasks.context import context_for
    from tasks.ha import read_view

    return read_view(context_for("lab")).leader


def wait_streaming(timeout: float = 300) -> None:
    from tasks.ha import wait_until_replicas_streaming

    wait_until_replicas_streaming.fn("lab", timeout=timeout)


def bench_switchovers(results: dict, traces: dict, rounds: int = 5) -> None:
    from flows.switchover import switchover

    gaps: dict[str, list[float]] = {name: [] for name in CLIENTS}
    lost = dict.fromkeys(CLIENTS, 0)
    for i in range(rounds):
        probes = client_probes(primary())
        for p in probes.values():
            p.start()
        time.sleep(2)
        completed(switchover(cluster="lab", return_state=True))
        time.sleep(2)
        measured = measure_clients(probes)
        for name, (gap, missing) in measured.items():
            gaps[name].append(gap)
            lost[name] += missing
        if i == 0:
            traces["switchover"] = probes["vip"].report
        log(f"switchover {i + 1}: write gap (s, acknowledged writes lost) by client {measured}")
    results["switchover_gaps_s"] = gaps["vip"]
    results["switchover_gap_median_s"] = statistics.median(gaps["vip"])
    results["switchover_lost_writes"] = lost["vip"]
    for name in ("port", "multihost"):
        results[f"switchover_{name}_gaps_s"] = gaps[name]
        results[f"switchover_{name}_gap_median_s"] = statistics.median(gaps[name])
        results[f"switchover_{name}_lost_writes"] = lost[name]


def bench_hard_failover(lab, results: dict, traces: dict, rounds: int = 0) -> None:
    """Median of HARD_FAILOVERS: where the old leader's key stands in its renewal cycle varies the gap by seconds."""
    from tasks.roles import wait_until_primary_is

    gaps: dict[str, list[float]] = {name: [] for name in CLIENTS}
    lost = dict.fromkeys(CLIENTS, 0)
    moves = []
    for _ in range(rounds or HARD_FAILOVERS):
        old = primary()
        probes = client_probes(old)
        for p in probes.values():
            p.start()
        time.sleep(3)
        lab.kill(old)
        new = wait_until_primary_is.fn("lab", None, not_host=old, timeout=120)
        # The port's HAProxy and the multi-host client notice the new primary a moment after the HA manager.
        time.sleep(5)
        measured = measure_clients(probes)
        for name, (gap, missing) in measured.items():
            gaps[name].append(gap)
            lost[name] += missing
        moves.append(f"{old} → {new}")
        traces.setdefault("hard_failover", probes["vip"].report)
        log(f"hard failover {old} → {new}: write gap (s, acknowledged writes lost) by client {measured}")
        lab.start(old)
        wait_streaming(600)
    results["hard_failover_gap_s"] = round(statistics.median(gaps["vip"]), 2)
    results["hard_failover_gaps_s"] = gaps["vip"]
    results["hard_failover_lost_writes"] = lost["vip"]
    results["hard_failover"] = ", ".join(moves)
    for name in ("port", "multihost"):
        results[f"hard_failover_{name}_gaps_s"] = gaps[name]
        results[f"hard_failover_{name}_gap_s"] = round(statistics.median(gaps[name]), 2)
        results[f"hard_failover_{name}_lost_writes"] = lost[name]


# A gap the writer sees without any role change is one tick (0.1 s) plus a commit; an outage is
# five ticks without an acknowledged write.
OUTAGE_S = 0.5


def bench_rolling_restart(results: dict, traces: dict) -> None:
    """change_settings with a parameter that needs a restart, across four members (the standbys
    one by one, each streaming again before the next, then one switchover), the writer running
    through the VIP: the total write gap of the whole roll against one switchover's (same run)."""
    from flows.add_standby import add_standby
    from flows.settings import change_settings

    completed(add_standby(cluster="lab", host="pg4", return_state=True))
    wait_streaming()
    p = probe().start()
    time.sleep(2)
    t0 = time.monotonic()
    done = completed(change_settings(cluster="lab", parameters={"shared_buffers": "160MB"}, return_state=True))
    seconds = time.monotonic() - t0
    time.sleep(2)
    results["rolling_restart_members"] = len(done["members"])
    gaps = record_roll(results, traces, "rolling_restart", p, seconds)
    results["rolling_restart_excess_s"] = round(sum(gaps) - results["switchover_gap_median_s"], 2)


def record_roll(results: dict, traces: dict, name: str, p, seconds: float) -> list[float]:
    """A whole rolling runbook under the writer: its duration, every outage, what was lost."""
    report = p.stop()
    gaps = report.gaps(OUTAGE_S)
    results[f"{name}_s"] = round(seconds, 1)
    results[f"{name}_gaps_s"] = [round(g, 2) for g in gaps]
    results[f"{name}_total_gap_s"] = round(sum(gaps), 2)
    results[f"{name}_lost_writes"] = len(p.missing_acknowledged())
    traces[name] = report
    log(f"{name} in {seconds:.1f}s: outages {gaps}, {results[f'{name}_lost_writes']} lost")
    return gaps


def bench_rolling_upgrade(results: dict, traces: dict) -> None:
    """rolling_upgrade of Patroni (the lab repository's 4.0.7 → 4.1.5) across four members in
    synchronous mode, each standby drained first, the writer running through the VIP: the total
    write gap of the whole roll against the largest single gap in it (its switchover), same run."""
    from flows.add_standby import add_standby
    from flows.basebackup import scheduled_basebackup
    from flows.upgrade import rolling_upgrade
    from lab.avprobe import AvailabilityProbe
    from lab.image import PATRONI_UPGRADE
    from tasks.context import context_for

    enable_sync(True)
    completed(add_standby(cluster="lab", host="pg4", return_state=True))
    completed(scheduled_basebackup(cluster="lab", return_state=True))  # the upgrade wants a fresh backup
    wait_streaming()
    # Eight hosts one at a time, apt on each: longer than a switchover probe's 300 s.
    p = AvailabilityProbe(context_for("lab", fresh=True).application_endpoint(VIP, 5432), max_seconds=1200).start()
    time.sleep(2)
    t0 = time.monotonic()
    done = completed(rolling_upgrade(cluster="lab", packages={"patroni": PATRONI_UPGRADE}, return_state=True))
    seconds = time.monotonic() - t0
    time.sleep(2)
    results["rolling_upgrade_hosts"] = len(done["upgraded"])
    gaps = record_roll(results, traces, "rolling_upgrade", p, seconds)
    results["rolling_upgrade_excess_s"] = round(sum(gaps) - max(gaps, default=0.0), 2)


def bench_tls(results: dict) -> None:
    """Switchover and hard-failover write gaps with TLS off and on, each on a lab built fresh that
    way, in this one run: what TLS (PostgreSQL, etcd, Patroni's REST API) costs a role change."""
    from lab.manager import Lab

    for tls in (False, True):
        lab = Lab(tls=tls)
        fresh_lab(lab)
        setup_rest(results)
        enable_sync(True)
        figures: dict = {}
        bench_switchovers(figures, {}, rounds=TLS_ROUNDS)
        bench_hard_failover(lab, figures, {}, rounds=TLS_ROUNDS)
        enable_sync(False)
        side = "on" if tls else "off"
        for key in ("switchover_gap_median_s", "switchover_lost_writes", "switchover_gaps_s", "hard_failover_gap_s",
                    "hard_failover_lost_writes", "hard_failover_gaps_s"):
            results[f"tls_{side}_{key}"] = figures[key]
        log(f"TLS {side}: switchover median {figures['switchover_gap_median_s']}s, hard failover median "
            f"{figures['hard_failover_gap_s']}s")
    for event, key in (("switchover", "switchover_gap_median_s"), ("hard_failover", "hard_failover_gap_s")):
        off, on = results[f"tls_off_{key}"], results[f"tls_on_{key}"]
        results[f"tls_{event}_gap_ratio"] = round(on / off, 2) if off else None


def bench_router_failover(lab, results: dict) -> None:
    from tasks.context import context_for
    from tasks.routing import vip_holders

    holder = vip_holders(context_for("lab"))[0]
    p = probe().start()
    time.sleep(3)
    lab.stop(holder)
    time.sleep(8)
    report = p.stop()
    lost = p.missing_acknowledged()
    results["router_failover_gap_s"] = round(report.longest_gap(), 2)
    results["router_failover_lost_writes"] = len(lost)
    log(f"router failover ({holder} off): write gap {results['router_failover_gap_s']}s, {len(lost)} lost")
    lab.start(holder)


def bench_backup_and_restore(lab, results: dict) -> None:
    from flows.basebackup import scheduled_basebackup
    from flows.restore_drill import restore_drill
    from tasks.restore import ensure_drill_torn_down, ensure_restore_host_configured

    leader = primary()
    log("loading ~1 GiB with pgbench -i -s 68")
    ssh(lab, leader, "runuser -u postgres -- /usr/lib/postgresql/15/bin/pgbench -q -i -s 68 -h /var/run/postgresql app")
    wait_streaming(600)
    size = int(ssh(lab, leader, "runuser -u postgres -- psql -XAt -c 'select sum(pg_database_size(oid)) from pg_database'").strip())
    results["database_bytes"] = size
    source = next(h for h in ("pg2", "pg3", "pg1") if h != leader)
    # Interleaved rounds, medians compared: a single pair is at the mercy of the previous run's
    # 1 GiB still being written back (restores of the same backup varied 2.5–4.0 s that way).
    raw_runs, flow_runs, ready_runs, raw_ready_runs, rto_runs = [], [], [], [], []
    backup: dict = {}
    phases: list[dict] = []
    for round_no in range(ROUNDS):
        settle()
        raw = ssh(lab, source, "rm -rf /var/tmp/raw-bb && install -d -o postgres /var/tmp/raw-bb && "
                               "s=$(date +%s.%N); runuser -u postgres -- pg_basebackup -D /var/tmp/raw-bb -X none "
                               "--checkpoint=fast --no-sync -h /var/run/postgresql; e=$(date +%s.%N); "
                               "python3 -c \"print($e - $s)\"; du -sb /var/tmp/raw-bb | cut -f1; rm -rf /var/tmp/raw-bb").split()
        raw_runs.append((float(raw[0]), int(raw[1])))
        settle()
        backup = completed(scheduled_basebackup(cluster="lab", force=True, kind="full", return_state=True))["backup"]
        flow_runs.append(backup)
        if round_no == 0:
            ensure_restore_host_configured.fn("lab")  # the raw restore needs pgBackRest's config there
            raw_restore(lab, backup["name"])  # warm-up, untimed
        # The object store serves a backup faster the second time (page cache): alternate which
        # restore goes first, after one untimed warm-up restore of the same backup.
        drill_first = round_no % 2 == 0
        if not drill_first:
            raw_ready_runs.append(raw_restore(lab, backup["name"]))
        settle()
        drill = completed(restore_drill(cluster="lab", backup=backup["name"], return_state=True))
        ready_runs.append(drill["ready_s"])
        rto_runs.append(drill["rto_s"])
        ensure_drill_torn_down.fn("lab")
        if drill_first:
            raw_ready_runs.append(raw_restore(lab, backup["name"]))
        phases.append(backup_phases(lab, backup["host"]))
    raw_mib_s = statistics.median(b / 2**20 / t for t, b in raw_runs)
    flow_mib_s = statistics.median(b["throughput_mib_s"] for b in flow_runs)
    results.update(raw_basebackup_s=round(statistics.median(t for t, _ in raw_runs), 1), raw_basebackup_mib_s=round(raw_mib_s, 1),
                   flow_backup_s=round(statistics.median(b["duration_s"] for b in flow_runs), 1),
                   flow_backup_mib_s=round(flow_mib_s, 1), backup_rounds=ROUNDS,
                   raw_basebackup_runs_s=[round(t, 2) for t, _ in raw_runs],
                   flow_backup_runs_s=[b["duration_s"] for b in flow_runs],
                   backup_throughput_ratio=round(flow_mib_s / raw_mib_s, 3), backup_source=backup.get("host"))
    median_phases = {k: round(statistics.median(p[k] for p in phases), 2) for k in phases[0]}
    copy_mib_s = statistics.median(b["size_mib"] / p["copy_s"] for b, p in zip(flow_runs, phases) if p["copy_s"] > 0)
    results.update(backup_phases_s=median_phases, copy_phase_mib_s=round(copy_mib_s, 1),
                   copy_phase_ratio=round(copy_mib_s / raw_mib_s, 3))
    log(f"backup: flow {flow_mib_s:.1f} MiB/s vs raw pg_basebackup {raw_mib_s:.1f} MiB/s → {results['backup_throughput_ratio']}; "
        f"phases {median_phases}")
    ready, raw_ready = statistics.median(ready_runs), statistics.median(raw_ready_runs)
    results.update(drill_ready_s=round(ready, 1), raw_restore_ready_s=round(raw_ready, 1),
                   drill_ready_runs_s=[round(x, 1) for x in ready_runs], raw_restore_ready_runs_s=[round(x, 1) for x in raw_ready_runs],
                   restore_ready_ratio=round(ready / raw_ready, 3), drill_rto_s=round(statistics.median(rto_runs), 1))
    log(f"restore: drill ready {ready:.1f}s vs raw {raw_ready:.1f}s → {results['restore_ready_ratio']}")


def bench_restore_cluster(lab, results: dict) -> None:
    """restore_cluster's time to a writable primary against the raw restore + recovery of the same
    backup to the same end, measured in this run; and until every standby streams again."""
    from flows.basebackup import scheduled_basebackup
    from flows.restore_cluster import restore_cluster
    from flows.restore_drill import restore_drill
    from tasks.restore import ensure_restore_host_configured

    leader = primary()
    size = int(ssh(lab, leader, "runuser -u postgres -- psql -XAt -c 'select sum(pg_database_size(oid)) from pg_database'").strip())
    if size < 2**30 // 2:  # the backup group loads ~1 GiB; alone, this group loads it itself
        log("loading ~1 GiB with pgbench -i -s 68")
        ssh(lab, leader, "runuser -u postgres -- /usr/lib/postgresql/15/bin/pgbench -q -i -s 68 -h /var/run/postgresql app")
        wait_streaming(600)
        size = int(ssh(lab, leader, "runuser -u postgres -- psql -XAt -c 'select sum(pg_database_size(oid)) from pg_database'").strip())
    settle()
    backup = completed(scheduled_basebackup(cluster="lab", force=True, kind="full", return_state=True))["backup"]["name"]
    # restore_cluster reads the last drill of its backup: one that passed, as on a site.
    completed(restore_drill(cluster="lab", backup=backup, return_state=True))
    ensure_restore_host_configured.fn("lab")
    raw_restore(lab, backup)  # warm-up, untimed: the object store serves the backup from its page cache after
    raw = raw_restore(lab, backup)
    settle()
    done = completed(restore_cluster(cluster="lab", target="latest", backup=backup, confirm_cluster="lab",
                                     confirm_target="latest", return_state=True))
    results.update(restore_cluster_database_bytes=size, restore_cluster_writable_s=done["writable_s"],
                   restore_cluster_streaming_s=done["all_streaming_s"], restore_cluster_raw_s=round(raw, 1),
                   restore_cluster_ratio=round(done["writable_s"] / raw, 3))
    log(f"restore_cluster: writable after {done['writable_s']}s, all streaming after {done['all_streaming_s']}s; "
        f"raw restore + recovery {raw:.1f}s → {results['restore_cluster_ratio']}")


def raw_restore(lab, backup: str) -> float:
    """pgBackRest restore + recovery to the end of the archive, by hand, in one shell on restore1.
    ssl off as in the drill: the backup carries the cluster's TLS settings, not the restore host
    the certificates they name."""
    settle()
    # set -e: a failed restore must fail the benchmark, not time an empty directory.
    out = ssh(lab, "restore1",
              "set -e; d=/var/lib/postgresql/15/main; rm -rf $d; install -d -o postgres -m 0700 $d; s=$(date +%s.%N); "
              f"runuser -u postgres -- pgbackrest --stanza=lab --pg1-path=$d --set={backup} --archive-mode=off "
              "--type=default restore; printf \"listen_addresses='localhost'\\narchive_mode=off\\nssl=off\\n\" >> $d/postgresql.auto.conf; "
              "runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D $d -l /var/tmp/raw.log -w -t 1800 start >/dev/null; "
              "until [ \"$(runuser -u postgres -- psql -XAt -h /var/run/postgresql -c 'select pg_is_in_recovery()')\" = f ]; do sleep 0.2; done; "
              "e=$(date +%s.%N); python3 -c \"print($e - $s)\"; runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D $d -m fast stop >/dev/null; rm -rf $d")
    return float(out.split()[-1])


def backup_phases(lab, host: str) -> dict:
    """Where the newest pgBackRest backup on `host` spent its time, from its own log (ms stamps)."""
    lines = ssh(lab, host, "awk '/backup command begin/ {n=0} {buf[n++]=$0} END {for (i=0;i<n;i++) print buf[i]}' "
                           "/var/log/pgbackrest/lab-backup.log").splitlines()

    def at(line: str) -> float:
        return datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S.%f").timestamp()

    begin = next(at(x) for x in lines if "backup command begin" in x)
    start = next(at(x) for x in lines if "execute non-exclusive backup start" in x)
    replayed = next(at(x) for x in lines if "check archive for prior segment" in x)
    files = [at(x) for x in lines if "DETAIL: backup file" in x]
    end = next(at(x) for x in lines if "backup command end" in x)
    return {"connect_and_checks_s": round(start - begin, 2), "checkpoint_and_replay_s": round(replayed - start, 2),
            "manifest_and_next_second_s": round(files[0] - replayed, 2),
            "copy_s": round(files[-1] - files[0], 2), "stop_and_finish_s": round(end - files[-1], 2)}


def settle() -> None:
    """Let the previous measurement's dirty pages reach the disk before the next one starts."""
    subprocess.run(["sync"], check=False, timeout=300)
    time.sleep(2)


def plot(traces: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 3.2 * len(traces)))
    axes = axes if len(traces) > 1 else [axes]
    for ax, (title, report) in zip(axes, traces.items()):
        t0 = report.attempts[0].sent
        ok = [(a.sent - t0, a.latency * 1000) for a in report.attempts if a.latency is not None]
        bad = [a.sent - t0 for a in report.attempts if a.latency is None]
        ax.plot([x for x, _ in ok], [y for _, y in ok], ".", markersize=3, label="acknowledged insert (latency)")
        if bad:
            ax.plot(bad, [1] * len(bad), "rx", markersize=4, label="failed insert")
        start, end = report.gap_window()
        ax.axvspan(start - t0, end - t0, color="orange", alpha=0.3, label=f"longest gap {end - start:.2f}s")
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("ms")
        ax.set_title(f"writes through the VIP every 100 ms: {title.replace('_', ' ')}")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


REPORT_ROWS = [
    ("lab up, 8 hosts (image present)", "lab_up_s", "s", "≤ 60 s"),
    ("image build", "image_build_s", "s", "—"),
    ("memory per idle host (RSS)", "idle_host_rss_mib", "MiB", "—"),
    ("build_cluster on bare hosts", "build_cluster_s", "s", "≤ 120 s"),
    ("orchestration overhead (flow ÷ plain script)", "orchestration_overhead_ratio", "×", "≤ 1.15"),
    ("planned switchover write gap, sync replication, median of 5", "switchover_gap_median_s", "s", "≤ 1.5 s"),
    ("acknowledged writes lost in 5 switchovers", "switchover_lost_writes", "", "0"),
    ("  the same 5, a client on one database host's port 25432", "switchover_port_gap_median_s", "s", "—"),
    ("  lost by that client", "switchover_port_lost_writes", "", "0"),
    ("  the same 5, a client on the multi-host URI (read-write)", "switchover_multihost_gap_median_s", "s", "—"),
    ("  lost by that client", "switchover_multihost_lost_writes", "", "0"),
    ("hard failover write gap (primary host killed), median of 3", "hard_failover_gap_s", "s", "≤ 23 s"),
    ("acknowledged writes lost in the hard failovers", "hard_failover_lost_writes", "", "counted"),
    ("  the same failovers, a client on one database host's port 25432", "hard_failover_port_gap_s", "s", "—"),
    ("  lost by that client", "hard_failover_port_lost_writes", "", "0"),
    ("  the same failovers, a client on the multi-host URI", "hard_failover_multihost_gap_s", "s", "—"),
    ("  lost by that client", "hard_failover_multihost_lost_writes", "", "0"),
    ("router failover write gap (VIP holder powered off)", "router_failover_gap_s", "s", "≤ 1 s"),
    ("rolling restart (change_settings, shared_buffers, 4 members), total write gap", "rolling_restart_total_gap_s",
     "s", "—"),
    ("  minus one switchover's gap (the median above), same run", "rolling_restart_excess_s", "s", "≤ 1 s"),
    ("  acknowledged writes lost in the rolling restart", "rolling_restart_lost_writes", "", "0"),
    ("rolling upgrade (rolling_upgrade, Patroni 4.0.7 → 4.1.5, 8 hosts, synchronous mode, standbys drained), "
     "total write gap", "rolling_upgrade_total_gap_s", "s", "—"),
    ("  minus its largest single gap (the switchover), same run", "rolling_upgrade_excess_s", "s", "≤ 1 s"),
    ("  acknowledged writes lost in the rolling upgrade", "rolling_upgrade_lost_writes", "", "0"),
    ("switchover write gap, TLS off, median of 3 (a lab built without TLS)", "tls_off_switchover_gap_median_s", "s",
     "—"),
    ("  the same, TLS on (PostgreSQL, etcd, Patroni's REST API), same run", "tls_on_switchover_gap_median_s", "s",
     "—"),
    ("  TLS on ÷ TLS off", "tls_switchover_gap_ratio", "×", "≤ 1.2"),
    ("hard failover write gap, TLS off, median of 3", "tls_off_hard_failover_gap_s", "s", "—"),
    ("  the same, TLS on, same run", "tls_on_hard_failover_gap_s", "s", "—"),
    ("  TLS on ÷ TLS off", "tls_hard_failover_gap_ratio", "×", "≤ 1.1"),
    ("acknowledged writes lost in those switchovers, TLS off", "tls_off_switchover_lost_writes", "", "0"),
    ("  the same, TLS on", "tls_on_switchover_lost_writes", "", "0"),
    ("basebackup throughput ÷ raw pg_basebackup", "backup_throughput_ratio", "×", "≥ 0.8"),
    ("  of which the copy phase alone ÷ raw pg_basebackup", "copy_phase_ratio", "×", "—"),
    ("restore-drill ready time ÷ raw restore + recovery", "restore_ready_ratio", "×", "≤ 1.2"),
    ("restore_cluster time to writable primary ÷ raw restore + recovery", "restore_cluster_ratio", "×", "≤ 1.3"),
    ("  restore_cluster until every standby streams", "restore_cluster_streaming_s", "s", "—"),
]
REPORT_ROWS += CHAIN_ROWS


def write_report(results: dict) -> None:
    (OUT / "report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [
        "# bouwsteen benchmark report",
        "",
        f"Last run {results.get('measured_at')} on this machine ({os.cpu_count()} cores), `{COMMAND}`.",
        "Each row says when its group was measured: a run with `--only` refreshes its groups and keeps the",
        "others from their own run. Every ratio compares two measurements of one group in one run, never",
        "figures of different runs. Raw figures are in `report.json`.",
        "",
        "| figure | value | goal | measured | reproduce |",
        "|---|---|---|---|---|",
    ]
    for label, key, unit, goal in REPORT_ROWS:
        value = results.get(key, "not measured")
        group = FIGURE_OF[key]
        when = results.get(f"measured_at_{group}", results.get("measured_at", "—"))
        lines.append(f"| {label} | {value} {unit} | {goal} | {when} | `{COMMAND} --only {group}` |")
    lines += [
        "",
        "Anchors: stolon's default `failInterval` is 20 s (unplanned failover ≈ 25–40 s at defaults); "
        "PgVillage's avchecker only reports gaps ≥ 7.5 s (1.5 × its 5 s interval).",
        "",
        f"Switchover gaps (s): {results.get('switchover_gaps_s')}. Hard failovers: {results.get('hard_failover', '—')}, gaps (s) {results.get('hard_failover_gaps_s', '—')}.",
        f"Backup and restore: medians of {results.get('backup_rounds', 1)} rounds, every measurement after `sync`; "
        "each round takes a raw and a flow backup, then restores that backup by hand and by drill, alternating "
        "which restore goes first (after one untimed warm-up restore).",
        f"Backup: flow {results.get('flow_backup_mib_s')} MiB/s ({results.get('flow_backup_s')} s, from "
        f"{results.get('backup_source')}) vs raw pg_basebackup {results.get('raw_basebackup_mib_s')} MiB/s "
        f"({results.get('raw_basebackup_s')} s) of a {round(results.get('database_bytes', 0) / 2**30, 2)} GiB cluster "
        f"(runs: flow {results.get('flow_backup_runs_s', '—')}, raw {results.get('raw_basebackup_runs_s', '—')}).",
        f"Restore: drill ready {results.get('drill_ready_s')} s (RTO with verification {results.get('drill_rto_s')} s) "
        f"vs raw pgBackRest restore + recovery {results.get('raw_restore_ready_s')} s "
        f"(runs: drill {results.get('drill_ready_runs_s', '—')}, raw {results.get('raw_restore_ready_runs_s', '—')}).",
        "",
        f"restore_cluster: writable after {results.get('restore_cluster_writable_s', '—')} s, every standby "
        f"streaming after {results.get('restore_cluster_streaming_s', '—')} s, vs raw pgBackRest restore + recovery "
        f"of the same backup {results.get('restore_cluster_raw_s', '—')} s (one round after an untimed warm-up; "
        f"{round(results.get('restore_cluster_database_bytes', 0) / 2**30, 2)} GiB). The runbook's time counts "
        "from before the archive's last segment is switched and every member stopped, to the restored primary "
        "accepting writes through Patroni.",
        "",
        f"Backup phases (pgBackRest's own log, medians): {results.get('backup_phases_s', '—')}; copy phase "
        f"{results.get('copy_phase_mib_s', '—')} MiB/s.",
        "",
        "Where a planned switchover's gap goes (Patroni 4.0.7's journal, PostgreSQL's and HAProxy's logs, lab,",
        "one switchover traced): the gap starts with the old primary's fast shutdown. Patroni has already run a",
        "CHECKPOINT before it (`stop(checkpoint=True)` in a graceful demotion), so the shutdown checkpoint",
        "takes ~0.15 s. Patroni then polls `pg_controldata` once a second (STOP_POLLING_INTERVAL, hard-coded;",
        "when the postmaster still runs after the shutdown checkpoint, archiving, it sleeps one more second",
        "before it lets the leader key go): the key goes ~1.2 s after the shutdown began. The candidate takes",
        "it within ~0.15 s and accepts writes ~0.1 s later; so ~1.45 s of every switchover are Patroni's,",
        "which bouwsteen cannot shorten without changing Patroni. Routing then adds the router's check of",
        "the detector (`downinter 250ms`) and, in parallel, the new primary's own port-25432 check of its",
        "Patroni (`downinter 200ms` for itself). Three routing delays were found and removed in this run's",
        "code: (1) a client connection that a database host's port 25432 sent to the stopped old primary,",
        "still UP there until its second failed check, hung 2 s in HAProxy's retries (one second's",
        "turnaround each): the 3.7 s gaps of earlier runs; a refused connection now fails at once and counts",
        "as a failed check (`retries 0`, `observe layer4`, `on-error fail-check`). The routers' rw backend",
        "retried the old primary's port the same way while it closed connections: `retries 0` there too.",
        "(2) The demoting primary",
        "kept answering `/primary` with its role until it let the key go, so the new primary's port saw two",
        "primaries and refused for up to a second more; the check now also wants `\"state\": \"running\"`",
        "(`stopping` from the moment Patroni stops PostgreSQL), checked every 500 ms. (3) The new primary's",
        "own port asked its Patroni every 500 ms; now every 200 ms, and the routers every 250 ms.",
        f"Rolling restart: outages (s) {results.get('rolling_restart_gaps_s', '—')} over "
        f"{results.get('rolling_restart_s', '—')} s for {results.get('rolling_restart_members', '—')} members: a",
        "standby's restart costs the writer nothing, the one switchover costs one switchover's gap.",
        "",
        "Where a hard failover's gap goes (Patroni journals, lab): the leader key's lease runs out 20 s after",
        "its last renewal (Patroni's TTL floor); the standby then asks every member it knew, the dead primary",
        "included, whether it is still primary (Patroni's hard-coded 2 s timeout); promotion takes ~0.2 s and",
        "HAProxy routes to the new primary within ~0.5 s. etcd's leader is kept off the primary's host:",
        "otherwise losing that host also costs an etcd election, after which every lease restarts its TTL.",
        "",
        "Where the backup's time goes (phases above, from pgBackRest's own log): pgBackRest on a standby",
        "reaches the primary over SSH, has it take an immediate checkpoint, waits for the standby to replay to",
        "it, builds the manifest and then sleeps until the primary's clock reaches the next whole second before",
        "it copies anything (pgBackRest always does: file times within the copy's start second are not trusted),",
        "0 to 1 s, 0.5 s on average, which pg_basebackup does not pay and which makes single runs noisy. It",
        "copies with zstd (level 1), AES and TLS in two processes, but one file is one process: pgbench's",
        "870 MiB accounts table is read, page-checked, SHA-1-summed and compressed on one core (~1.2 s; ~1.7 s",
        "with lz4). Then it stops the backup and waits for the stop segment to be archived. Backup and drill",
        "timings are of the commands on the hosts; the controller's SSH connection set-up is not counted (the",
        "raw runs are timed inside their shell too). The lab runs pgBackRest 2.55.1: Debian 12's 2.45 sleeps",
        "100 ms before reading each answer from PostgreSQL (~2 s per backup here).",
        "At 1 GiB the costs that do not grow with size decide the ratio: pgBackRest copies faster than",
        "pg_basebackup (the copy-phase ratio above), but SSH, checkpoint and replay, the next-second sleep and",
        "the wait for the stop segment add ~1.2 s on average to every backup, which pg_basebackup to local",
        "disk does not pay. A single backup reaches 0.8 of the raw throughput only when its next-second sleep",
        "happens to be short; the median of five rarely does.",
        "The drill also isolates the restored instance (no archiving, no replication, local listen only) and",
        "waits for promotion; its verification (amcheck, markers) is in the RTO, not in the ready time.",
        "",
        f"Full and incremental backups by size (`--only chains`): {results.get('chains', 'not measured yet')}.",
        "",
        "![backup time against size and change](chains.png)",
        "",
        "![write latency and gaps through the VIP](writes.png)",
        "",
    ]
    (OUT / "REPORT.md").write_text("\n".join(lines))


FIGURE_OF = {
    "lab_up_s": "lab", "image_build_s": "image", "idle_host_rss_mib": "lab", "build_cluster_s": "build",
    "orchestration_overhead_ratio": "build", "switchover_gap_median_s": "roles", "switchover_lost_writes": "roles",
    "hard_failover_gap_s": "roles", "hard_failover_lost_writes": "roles", "router_failover_gap_s": "roles",
    "rolling_restart_total_gap_s": "roles", "rolling_restart_excess_s": "roles", "rolling_restart_lost_writes": "roles",
    **{f"{event}_{client}_{figure}": "roles" for event in ("switchover", "hard_failover")
       for client in ("port", "multihost") for figure in ("gap_median_s", "gap_s", "lost_writes")},
    "backup_throughput_ratio": "backup", "restore_ready_ratio": "backup", "copy_phase_ratio": "backup",
    **{f"tls_{side}_{key}": "tls" for side in ("on", "off")
       for key in ("switchover_gap_median_s", "switchover_lost_writes", "hard_failover_gap_s",
                   "hard_failover_lost_writes")},
    "tls_switchover_gap_ratio": "tls", "tls_hard_failover_gap_ratio": "tls",
    "restore_cluster_ratio": "restore", "restore_cluster_streaming_s": "restore",
    "rolling_upgrade_total_gap_s": "upgrade", "rolling_upgrade_excess_s": "upgrade",
    "rolling_upgrade_lost_writes": "upgrade",
    **{key: "chains" for _, key, _, _ in CHAIN_ROWS},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=["image", "lab", "build", "roles", "backup", "tls",
                                                                 "restore", "upgrade", "chains"])
    parser.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from report.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(json.loads((OUT / "report.json").read_text()))
        return 0
    only = set(args.only or ["image", "lab", "build", "roles", "backup", "tls", "restore", "upgrade", "chains"])
    from lab.manager import Lab

    lab = Lab()
    previous = json.loads((OUT / "report.json").read_text()) if (OUT / "report.json").exists() else {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # A partial run (--only) keeps the other groups' figures from their own run, dated as such.
    earlier = previous.get("measured_at", "unknown")
    results: dict = {**previous, "measured_at": started,
                     **{f"measured_at_{group}": previous.get(f"measured_at_{group}", earlier)
                        for group in set(FIGURE_OF.values()) - only},
                     **{f"measured_at_{group}": started for group in only}}
    traces: dict = {}
    setup_prefect()
    if "image" in only:
        bench_image(results)
    if "lab" in only:
        bench_lab_up(lab, results)
    if "build" in only:
        bench_build(lab, results)
    if only & {"roles", "backup", "restore", "upgrade", "chains"}:
        if "build" not in only:
            fresh_lab(lab)
        setup_rest(results)
    if "roles" in only:
        enable_sync(True)
        bench_switchovers(results, traces)
        bench_hard_failover(lab, results, traces)
        bench_router_failover(lab, results)
        enable_sync(False)
        bench_rolling_restart(results, traces)
        plot(traces, OUT / "writes.png")
    if "backup" in only:
        bench_backup_and_restore(lab, results)
    if "restore" in only:
        bench_restore_cluster(lab, results)
    if "chains" in only:
        from benchmarks.chains import bench_chains, plot_chains

        bench_chains(lab, results, ssh=ssh, completed=completed, settle=settle, primary=primary,
                     wait_streaming=wait_streaming, raw_restore=raw_restore, log=log)
        plot_chains(results["chains"], OUT / "chains.png")
    if "upgrade" in only:
        # Last on this lab: every later group would run on the upgraded Patroni.
        if only & {"roles", "backup", "restore", "chains"}:
            fresh_lab(lab)
            setup_rest(results)
        bench_rolling_upgrade(results, traces)
    if "tls" in only:
        bench_tls(results)
    write_report(results)
    log(f"wrote {OUT / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
