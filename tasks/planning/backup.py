"""Pure decisions for backups and restore drills: which host, whether to skip, which backup."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from blocks.inventory import HaManager, Inventory, Role
from tasks.adapters.backup.base import BackupInfo, BackupKind
from tasks.errors import BouwsteenError, DrillFailed
from tasks.planning.plan import Action, ActionPlan

if TYPE_CHECKING:
    from tasks.restore import Marker


class BackupPlanError(BouwsteenError, ValueError):
    """A request that cannot be satisfied (no backup, target out of range); names the parameter."""


@dataclass(frozen=True)
class SourceCandidate:
    host: str
    role: str  # primary | replica
    streaming: bool
    lag_bytes: int | None


@dataclass(frozen=True)
class BackupDecision:
    run: bool
    source: str | None
    reason: str
    kind: BackupKind = "full"
    kind_reason: str = ""

    def plan(self, keep_full: int) -> ActionPlan:
        if not self.run:
            return ActionPlan(nothing_to_do=f"No backup tonight: {self.reason}.")
        what = "full base backup" if self.kind == "full" else "incremental base backup"
        why = f"{self.reason}; {self.kind_reason}" if self.kind_reason else self.reason
        return ActionPlan((Action(self.source or "?", f"{what} ({why}), then keep the newest {keep_full} full "
                                                     "backup(s) with the incrementals that build on them"),))


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# However the schedule reads, no incremental chain grows longer than a week: the restore of its
# newest member replays every link, and a broken link loses the rest of the chain.
MAX_CHAIN = timedelta(days=7)


def full_weekdays(names: Sequence[str]) -> frozenset[int]:
    """full_on's day names (UTC, as the schedules run) as weekday numbers; BackupPlanError naming
    the entry that is no day."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        return _no_days(f"full_on: give a list of day names ({', '.join(WEEKDAYS)}), not {names!r}")
    days = set()
    for index, name in enumerate(names):
        if not isinstance(name, str) or name.strip().lower() not in WEEKDAYS:
            return _no_days(f"full_on[{index}]: {name!r} is not a day name ({', '.join(WEEKDAYS)})")
        days.add(WEEKDAYS.index(name.strip().lower()))
    return frozenset(days)


def _no_days(message: str) -> frozenset[int]:
    raise BackupPlanError(message)


def backup_kind(backups: Sequence[BackupInfo], now: datetime, full_on: frozenset[int],
                asked: str = "auto") -> tuple[BackupKind, str]:
    """Tonight's kind and why: full on the schedule's full nights, when no good full exists to
    build on, or when the newest full is a week old (full nights missed); else an incremental.
    `asked` ("full", "incr") overrides the schedule, but an incremental needs a full to build on."""
    fulls = [b for b in good_backups(backups) if b.kind == "full"]
    if not fulls:
        return "full", "no good full backup to build an incremental on"
    newest = max(fulls, key=lambda b: b.finish_time)
    if asked == "full":
        return "full", "a full backup asked for"
    if asked == "incr":
        return "incr", f"an incremental asked for, on full backup {newest.name}"
    if now.weekday() in full_on:
        return "full", f"{WEEKDAYS[now.weekday()].capitalize()} is a full night"
    if now - newest.finish_time >= MAX_CHAIN:
        return "full", f"the newest full backup {newest.name} is {_hours(now - newest.finish_time)} old"
    return "incr", f"incremental on full backup {newest.name}"


def good_backups(backups: Sequence[BackupInfo]) -> list[BackupInfo]:
    return [b for b in backups if not b.error]


def newest_good(backups: Sequence[BackupInfo]) -> BackupInfo | None:
    good = good_backups(backups)
    return max(good, key=lambda b: b.finish_time) if good else None


def choose_source(candidates: list[SourceCandidate], max_lag_bytes: int) -> SourceCandidate:
    """A healthy streaming standby with the least lag (the primary stays free), else the primary."""
    standbys = [c for c in candidates if c.role == "replica" and c.streaming and c.lag_bytes is not None
                and c.lag_bytes <= max_lag_bytes]
    if standbys:
        return min(standbys, key=lambda c: (c.lag_bytes, c.host))
    primaries = [c for c in candidates if c.role == "primary"]
    if not primaries:
        raise BackupPlanError("no primary and no streaming standby to take a backup from")
    return primaries[0]


def decide_backup(
    backups: Sequence[BackupInfo], now: datetime, *, skip_window: timedelta, force: bool, source: str,
    full_on: frozenset[int] = frozenset(range(7)), asked: str = "auto",
) -> BackupDecision:
    """Whether to back up tonight, and (`full_on`: the full nights; `asked`: a kind given) which."""
    kind, why = backup_kind(backups, now, full_on, asked)
    decided = _decided(backups, now, skip_window=skip_window, force=force, source=source)
    return replace(decided, kind=kind, kind_reason=why) if decided.run else decided


def _decided(backups: Sequence[BackupInfo], now: datetime, *, skip_window: timedelta, force: bool,
             source: str) -> BackupDecision:
    newest = newest_good(backups)
    if force:
        return BackupDecision(True, source, "forced")
    if newest is not None and now - newest.finish_time < skip_window:
        age = now - newest.finish_time
        return BackupDecision(False, None, f"backup {newest.name} is {_hours(age)} old, inside the "
                                            f"{_hours(skip_window)} skip window")
    if newest is None:
        return BackupDecision(True, source, "no good backup exists yet")
    return BackupDecision(True, source, f"newest good backup {newest.name} is {_hours(now - newest.finish_time)} old")


def copy_processes(cores: int, *, on_primary: bool) -> int:
    """Parallel copy streams for a backup on a host with `cores`: every core of a standby (replay
    is its only other work), half of the primary's (it serves the clients); 1 to 16."""
    share = cores // 2 if on_primary else cores
    return max(1, min(16, share))


def freshness_problem(backups: Sequence[BackupInfo], now: datetime, limit: timedelta) -> str | None:
    newest = newest_good(backups)
    if newest is None:
        return "there is no good backup at all"
    age = now - newest.finish_time
    if age > limit:
        return f"the newest good backup {newest.name} is {_hours(age)} old, older than the {_hours(limit)} limit"
    return None


def expected_after_retention(backups: Sequence[BackupInfo], keep_full: int) -> list[BackupInfo]:
    """The newest `keep_full` fulls and every backup after the oldest of them, whose chains lead
    back to a kept full; an incremental of an expired full goes with it (no orphans)."""
    if keep_full < 1:
        raise BackupPlanError(f"keep_full: must be at least 1, got {keep_full}")
    good = sorted(good_backups(backups), key=lambda b: b.start_time)
    fulls = [b for b in good if b.kind == "full"][-keep_full:]
    if not fulls:
        return []
    return [b for b in good if b.start_time >= fulls[0].start_time]


# ----------------------------------------------------------------------------- restore


def parse_target(target: str, now: datetime) -> datetime | None:
    """'latest' → None; else an ISO-8601 time with a zone, not in the future."""
    if target.strip().lower() == "latest":
        return None
    try:
        moment = datetime.fromisoformat(target.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BackupPlanError(f"target: {target!r} is neither 'latest' nor an ISO-8601 time "
                              "(like 2026-11-27T10:15:00+01:00)") from None
    if moment.tzinfo is None:
        raise BackupPlanError(f"target: {target!r} has no time zone; add one (e.g. +01:00 or Z)")
    if moment > now:
        raise BackupPlanError(f"target: {moment.isoformat()} is in the future (now {now.isoformat(timespec='seconds')})")
    return moment


def pick_restore_backup(backups: Sequence[BackupInfo], target: datetime | None, named: str | None) -> BackupInfo:
    good = sorted(good_backups(backups), key=lambda b: b.finish_time)
    if not good:
        raise BackupPlanError("backup: the repository has no good backup to restore")
    if named is not None:
        chosen = next((b for b in good if b.name == named), None)
        if chosen is None:
            raise BackupPlanError(f"backup: {named!r} is not among the good backups ({', '.join(b.name for b in good)})")
        if target is not None and chosen.finish_time > target:
            raise BackupPlanError(f"target: {target.isoformat()} precedes the end of backup {named} "
                                  f"({chosen.finish_time.isoformat()}); recovery cannot stop before a backup is consistent")
        return chosen
    if target is None:
        return good[-1]
    usable = [b for b in good if b.finish_time <= target]
    if not usable:
        raise BackupPlanError(f"target: {target.isoformat()} precedes the oldest backup's end "
                              f"({good[0].finish_time.isoformat()}); nothing can be restored to that time")
    return usable[-1]


def drill_plan(chosen: BackupInfo | None, restore_host: str, target: datetime | None, keep: bool,
               refusals: Sequence[str] = ()) -> ActionPlan:
    """The drill's one action; it writes a marker row on the primary when it recovers to the end.
    Refused (no action) when pre-flight found a reason, which a missing `chosen` must come with."""
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    if chosen is None:
        raise ValueError("drill_plan: no backup chosen and nothing refused")
    recover_to = target.isoformat() if target else "the end of the archive (after a fresh marker row)"
    return ActionPlan((Action(restore_host, f"restore {chosen.name} (finished {chosen.finish_time.isoformat(timespec='seconds')}), "
                                            f"recover to {recover_to} in isolation, verify, "
                                            f"{'keep it running' if keep else 'then tear it down'}"),))


def compare_markers(source: list[list[str]], restored: list[list[str]], target: datetime | None,
                     marker: "Marker | None") -> str:
    """The restored copy (a drill's, or the live cluster after restore_cluster) must hold exactly
    the source's markers up to what it replayed: DrillFailed naming the rows when it does not."""
    restored_ids = {r[0] for r in restored}
    if target is None:
        if marker and str(marker.id) not in restored_ids:
            raise DrillFailed(f"marker {marker.id} written before the drill is missing: recovery stopped early")
        missing = [r[0] for r in source if r[0] not in restored_ids and (not marker or int(r[0]) <= int(marker.id))]
    else:
        cutoff = target.isoformat()
        after = [r for r in restored if datetime.fromisoformat(r[1]) > target]
        if after:
            raise DrillFailed(f"markers written after the target {cutoff} are present: {[r[0] for r in after]}")
        missing = [r[0] for r in source if datetime.fromisoformat(r[1]) <= target and r[0] not in restored_ids]
    if missing:
        raise DrillFailed(f"markers {missing} exist on the source before the target but not in the restored copy")
    # A row the source does not have, or has with another time, came from writes the source no
    # longer holds: the backup belongs to another history (a timeline abandoned by a failover).
    written = {r[0]: datetime.fromisoformat(r[1]) for r in source}
    foreign = [r[0] for r in restored if r[0] not in written or datetime.fromisoformat(r[1]) != written[r[0]]]
    if foreign:
        raise DrillFailed(f"markers {foreign} in the restored copy are not the source's (absent there, or written "
                          "at another time): the backup holds a history the source does not")
    return f"{len(restored)} marker row(s) match the source up to the target"


# ----------------------------------------------------------------------------- restore for real (issue 17)

DRILL_RECENT = timedelta(days=8)


@dataclass(frozen=True)
class DrillRecord:
    """One restore_drill run as the Prefect server recorded it."""

    backup: str | None  # None: the run failed before it chose a backup
    finished: datetime
    passed: bool


def drill_verdict(records: Sequence[DrillRecord], backup_name: str, now: datetime,
                  recent: timedelta = DRILL_RECENT) -> tuple[str | None, str | None]:
    """(refusal, warning) for restoring `backup_name` over a live cluster: refused when the last
    drill of that backup failed, since it is known not to restore; a warning, not a refusal, when
    no drill of it passed lately (the day it is needed is no day to wait a week for one)."""
    own = sorted((r for r in records if r.backup == backup_name), key=lambda r: r.finished)
    if own and not own[-1].passed:
        return (f"backup: the last restore drill of {backup_name} ({own[-1].finished.isoformat(timespec='minutes')}) "
                "failed; drill it again or name another backup", None)
    if not any(r.passed and r.finished >= now - recent for r in own):
        return None, (f"no restore drill of {backup_name} passed in the last {recent.days} days: it is restored "
                      "without that evidence")
    return None, None


def confirmation_refusal(cluster: str, target: str, confirm_cluster: str, confirm_target: str) -> str | None:
    """The guard against an accident: the cluster's name and the target, typed back exactly."""
    wrong = [field for field, given, wanted in (("confirm_cluster", confirm_cluster, cluster),
                                                ("confirm_target", confirm_target, target)) if given != wanted]
    if not wrong:
        return None
    return (f"{' and '.join(wrong)}: restore_cluster replaces every member's data; type the cluster name "
            f"{cluster!r} and the target {target!r} back to go ahead")


def _restore_layout(plan: str, members: Sequence[str], primary: str,
                    target: datetime | None) -> tuple[list[str], str]:
    """The standbys to clone again from `primary`, and the recovery target in words."""
    if primary not in members:
        raise ValueError(f"{plan}: primary {primary!r} is not among the members {list(members)}")
    return [m for m in members if m != primary], target.isoformat() if target else "the end of the archive"


def plan_cluster_restore(cluster: str, members: Sequence[str], primary: str, chosen: BackupInfo,
                         target: datetime | None, now: datetime, *, keep_aside: bool,
                         refusals: Sequence[str] = ()) -> ActionPlan:
    """restore_cluster's plan: what happens on which member, and, first among the notes, what is
    lost. `keep_aside`: the primary's disk has room to keep its data directory until verified."""
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    standbys, recover_to = _restore_layout("plan_cluster_restore", members, primary, target)
    lost = (f"Lost: every change committed on {', '.join(members)} after {target.isoformat()} "
            f"({_span(now - target)} of writes up to now)." if target else
            "Lost: changes committed after the last archived WAL segment (none when archiving keeps up).")
    actions = [Action(m, "stop the HA manager and PostgreSQL") for m in members]
    actions.append(Action(primary, f"keep {'the data directory aside (renamed) until verified' if keep_aside else 'nothing: no room to keep the data directory aside'}; "
                                   f"restore {chosen.name} (finished {chosen.finish_time.isoformat(timespec='seconds')}) "
                                   f"and recover to {recover_to}; the HA manager's state started afresh from it"))
    actions += [Action(m, f"cloned again from {primary}") for m in standbys]
    actions.append(Action("cluster", "routing follows the primary; a fresh full backup of the new timeline"))
    notes = [lost]
    if not keep_aside:
        notes.append(f"{primary}'s current data directory is overwritten, not kept aside: its disk has no room for both.")
    return ActionPlan(tuple(actions), notes=tuple(notes))


def clone_refusals(source: Inventory, target: Inventory) -> list[str]:
    """clone_cluster restores `source`'s backup onto `target`'s hosts: a cluster of its own that
    can read the source's backups and shares nothing the source writes to. Both clusters' names
    set their etcd and bucket prefixes, so a distinct name keeps those apart."""
    refusals = []
    src, dst = source.cluster, target.cluster
    if dst.name == src.name:
        refusals.append(f"cluster: {dst.name!r} is the source cluster itself; restore_cluster restores in place")
    used = {h.name: h for h in source.hosts if h.roles}
    addresses = {str(h.address): h.name for h in source.hosts if h.roles}
    for host in target.hosts:
        if not host.roles:
            continue
        if host.name in used or str(host.address) in addresses:
            owner = host.name if host.name in used else addresses[str(host.address)]
            if not (host.has(Role.backup) and used.get(owner) is not None and used[owner].has(Role.backup)):
                refusals.append(f"cluster: host {host.name} ({host.address}) is also {owner} of cluster "
                                f"{src.name}: a clone gets hosts of its own")
    if dst.postgres.version != src.postgres.version:
        refusals.append(f"cluster: PostgreSQL {dst.postgres.version} cannot restore a backup of "
                        f"PostgreSQL {src.postgres.version}")
    if dst.backup_tool != src.backup_tool:
        refusals.append(f"cluster: {dst.backup_tool.value} cannot read {src.name}'s {src.backup_tool.value} backups")
    if src.object_store is None:
        refusals.append(f"source: cluster {src.name} has no object store, so no backup to clone from")
    elif dst.object_store is None:
        refusals.append(f"cluster: {dst.name} has no object store to archive its own timeline to")
    if dst.ha_manager is HaManager.stolon:
        # stolon's pitr init would start the keepers against the source's role passwords, which the
        # clone's keepers do not know; Patroni's clone resets them before the HA manager starts.
        refusals.append(f"cluster: {dst.name} runs stolon; clone_cluster clones into Patroni clusters only "
                        "(stolon's pitr init cannot set the clone's own role passwords)")
    return refusals


# Post-clone SQL runs as the superuser on a copy nobody can reach yet: bounded, one statement
# list, no NUL bytes (psql would stop reading there).
POST_CLONE_SQL_LIMIT = 64 * 1024


def post_clone_sql_refusal(statements: Sequence[str]) -> str | None:
    if not isinstance(statements, (list, tuple)) or not all(isinstance(s, str) for s in statements):
        return "post_clone_sql: give a list of SQL texts"
    for index, text in enumerate(statements):
        if not text.strip():
            return f"post_clone_sql[{index}]: empty"
        if "\x00" in text:
            return f"post_clone_sql[{index}]: contains a NUL byte"
    if sum(len(s.encode()) for s in statements) > POST_CLONE_SQL_LIMIT:
        return f"post_clone_sql: longer than {POST_CLONE_SQL_LIMIT // 1024} KiB in all; run a TAB job for more"
    return None


def plan_clone(source: str, cluster: str, members: Sequence[str], primary: str, chosen: BackupInfo,
               target: datetime | None, *, holds_data: bool, built: bool, post_sql: int,
               refusals: Sequence[str] = ()) -> ActionPlan:
    """clone_cluster's plan: `source`'s backup onto `cluster`'s members. `holds_data`: the
    target already has a database (lost, first among the notes); `built`: build_cluster ran there."""
    if refusals:
        return ActionPlan(refusals=tuple(refusals))
    standbys, recover_to = _restore_layout("plan_clone", members, primary, target)
    actions = [] if built else [Action(cluster, "build_cluster first: etcd, Patroni, certificates, roles")]
    actions += [Action(m, "stop the HA manager and PostgreSQL") for m in members]
    actions.append(Action(primary, f"restore {source}'s {chosen.name} (finished "
                                   f"{chosen.finish_time.isoformat(timespec='seconds')}) with {source}'s restore key "
                                   f"and recover to {recover_to}, archiving off; {cluster}'s own role passwords"
                                   + (f" and {post_sql} post-clone SQL statement(s)" if post_sql else "")
                                   + " before anyone can connect; the HA manager's state started afresh from it"))
    actions += [Action(m, f"cloned from {primary}") for m in standbys]
    actions.insert(len(members) + (0 if built else 1), Action(
        cluster, "its own backup repository emptied: it starts afresh with the clone"))
    actions.append(Action(cluster, f"a full backup in its own repository ({source}'s archive is only read)"))
    notes = [f"Lost: {cluster}'s current data on {', '.join(members)}, and the backups and WAL of it in "
             f"{cluster}'s own repository." if holds_data else
             f"{cluster} holds no database yet: nothing is lost."]
    return ActionPlan(tuple(actions), notes=tuple(notes))


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"


# Room the restored copy needs beside the kept-aside one, over the backup's own size: WAL fetched
# for replay, and the new timeline's first segments before they are archived.
RESTORE_HEADROOM = (0.10, 256 * 2**20)


def room_to_keep_aside(free_bytes: int, restored_bytes: int) -> bool:
    """Renaming the primary's data directory costs nothing; restoring beside it needs the whole
    restored copy on the same filesystem, with headroom."""
    share, floor = RESTORE_HEADROOM
    return free_bytes >= restored_bytes + max(int(restored_bytes * share), floor)


def _span(delta: timedelta) -> str:
    """A restore's loss in the unit a DBA weighs it in: minutes for the usual ticket, hours beyond."""
    minutes = delta.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
