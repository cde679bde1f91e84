"""Issue 19's figures (`--only chains`): full and incremental backups at 1 GiB and 4 GiB of pgbench
data in one run, each against its own baseline measured in the same run on the same host:

- full backup through the flow ÷ raw `pg_basebackup` (time);
- the flow's full ÷ the very command the flow renders, typed into a shell on the same host;
- the incremental after a day's OLTP change ÷ the full (stored bytes and time);
- the restore drill from that incremental ÷ the same restore and recovery by hand.

A day's change is made the way an OLTP day makes it: new rows (2 % of the accounts) and updates
concentrated on the newest rows, not random updates that touch every page.
"""

from __future__ import annotations

import statistics

# pgbench scale factors: 68 → ~1 GiB, 272 → ~4 GiB of database on disk.
SIZES = {"1gib": 68, "4gib": 272}
NEW_ROWS_SHARE = 0.02
PSQL = "runuser -u postgres -- psql -XAt -v ON_ERROR_STOP=1 -h /var/run/postgresql"


def bench_chains(lab, results: dict, *, ssh, completed, settle, primary, wait_streaming, raw_restore, log) -> None:
    """Both sizes in this one run; the figures go to results['chains'] and the report's rows."""
    from flows.basebackup import scheduled_basebackup
    from flows.restore_drill import restore_drill
    from tasks.context import context_for
    from tasks.desired import backup_driver
    from tasks.planning.backup import copy_processes
    from tasks.restore import ensure_drill_torn_down, ensure_restore_host_configured

    figures: dict = {}
    for label, scale in SIZES.items():
        leader = primary()
        log(f"chains {label}: pgbench -i -s {scale}")
        ssh(lab, leader, f"runuser -u postgres -- /usr/lib/postgresql/15/bin/pgbench -q -i -s {scale} "
                         "-h /var/run/postgresql app")
        wait_streaming(1800)
        size = int(ssh(lab, leader, f"{PSQL} -c 'select sum(pg_database_size(oid)) from pg_database'").strip())
        source = next(h for h in ("pg2", "pg3", "pg1") if h != leader)

        settle()
        raw = ssh(lab, source, "rm -rf /var/tmp/raw-bb && install -d -o postgres /var/tmp/raw-bb && "
                               "s=$(date +%s.%N); runuser -u postgres -- pg_basebackup -D /var/tmp/raw-bb -X none "
                               "--checkpoint=fast --no-sync -h /var/run/postgresql; e=$(date +%s.%N); "
                               "python3 -c \"print($e - $s)\"; rm -rf /var/tmp/raw-bb").split()
        raw_s = float(raw[0])

        settle()
        full = completed(scheduled_basebackup(cluster="lab", force=True, kind="full", return_state=True))["backup"]
        # The command the flow ran, rendered by the same driver, typed into a shell on the same host.
        ctx = context_for("lab", fresh=True)
        inv = ctx.inventory
        cores = int(ssh(lab, full["host"], "nproc").strip())
        command = backup_driver(inv).backup_command(inv, inv.host(full["host"]), inv.host(leader), "full",
                                                    copy_processes(cores, on_primary=full["host"] == leader))
        settle()
        hand = ssh(lab, full["host"], f"s=$(date +%s.%N); {command.render()} >/dev/null; e=$(date +%s.%N); "
                                      "python3 -c \"print($e - $s)\"").split()
        hand_s = float(hand[-1])

        log(f"chains {label}: a day's change (new rows {NEW_ROWS_SHARE:.0%}, updates on the newest)")
        rows = scale * 100_000
        new = int(rows * NEW_ROWS_SHARE)
        ssh(lab, leader, f"{PSQL} -d app -c \"insert into pgbench_accounts (aid, bid, abalance, filler) "
                         f"select a, 1 + (a - 1) / 100000, 0, '' from generate_series({rows + 1}, {rows + new}) a\"")
        ssh(lab, leader, f"{PSQL} -d app -c \"update pgbench_accounts set abalance = abalance + 1 "
                         f"where aid > {rows + new // 2}\"")
        wait_streaming(600)
        settle()
        incr = completed(scheduled_basebackup(cluster="lab", force=True, kind="incr", return_state=True))["backup"]
        assert incr["kind"] == "incr", incr

        ensure_restore_host_configured.fn("lab")
        raw_restore(lab, incr["name"])  # warm-up, untimed
        raw_ready = raw_restore(lab, incr["name"])
        settle()
        drill = completed(restore_drill(cluster="lab", backup=incr["name"], return_state=True))
        ensure_drill_torn_down.fn("lab")

        figures[label] = {
            "database_bytes": size, "raw_basebackup_s": round(raw_s, 2),
            "full_s": full["duration_s"], "full_stored_mib": full["stored_mib"], "hand_full_s": round(hand_s, 2),
            "incr_s": incr["duration_s"], "incr_stored_mib": incr["stored_mib"],
            "drill_ready_s": drill["ready_s"], "raw_restore_ready_s": round(raw_ready, 2),
            "full_vs_raw_ratio": round(raw_s / full["duration_s"], 3),  # throughput: ≥ 1.0 is as fast
            "flow_vs_hand_ratio": round(full["duration_s"] / hand_s, 3),
            "incr_stored_ratio": round(incr["stored_mib"] / full["stored_mib"], 3),
            "incr_time_ratio": round(incr["duration_s"] / full["duration_s"], 3),
            "drill_vs_raw_ratio": round(drill["ready_s"] / raw_ready, 3),
        }
        log(f"chains {label}: {figures[label]}")
    results["chains"] = figures
    for key in ("full_vs_raw_ratio", "flow_vs_hand_ratio", "incr_stored_ratio", "incr_time_ratio", "drill_vs_raw_ratio"):
        for label in SIZES:
            results[f"chains_{label}_{key}"] = figures[label][key]
    results["chains_backup_s_median"] = statistics.median(f["full_s"] for f in figures.values())


def plot_chains(figures: dict, path) -> None:
    """Backup time against size, full and incremental side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(figures)
    sizes = [figures[label]["database_bytes"] / 2**30 for label in labels]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [figures[label]["raw_basebackup_s"] for label in labels], "o--", label="raw pg_basebackup")
    ax.plot(sizes, [figures[label]["full_s"] for label in labels], "o-", label="full backup (flow)")
    ax.plot(sizes, [figures[label]["incr_s"] for label in labels], "o-",
            label=f"incremental after {NEW_ROWS_SHARE:.0%} new rows (flow)")
    ax.set_xlabel("database size (GiB)")
    ax.set_ylabel("seconds")
    ax.set_title("Backup time against size and change")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REPORT_ROWS = [
    (f"chains {label}: full backup throughput ÷ raw pg_basebackup", f"chains_{label}_full_vs_raw_ratio", "×",
     "≥ 1.0 at 4 GiB")
    for label in SIZES
] + [
    (f"chains {label}: flow's full ÷ the same pgBackRest command by hand", f"chains_{label}_flow_vs_hand_ratio", "×",
     "≤ 1.05")
    for label in SIZES
] + [
    (f"chains {label}: incremental after a day ÷ full, stored bytes", f"chains_{label}_incr_stored_ratio", "×",
     "≤ 0.15 at 4 GiB")
    for label in SIZES
] + [
    (f"chains {label}: incremental after a day ÷ full, time", f"chains_{label}_incr_time_ratio", "×", "≤ 0.35 at 4 GiB")
    for label in SIZES
] + [
    (f"chains {label}: drill from the incremental ÷ raw restore + recovery", f"chains_{label}_drill_vs_raw_ratio", "×",
     "≤ 1.2")
    for label in SIZES
]
