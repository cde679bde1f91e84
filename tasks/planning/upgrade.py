"""Pure decisions for a rolling package upgrade: what each host needs, whether the cluster is fit
to start, the order (standbys, a switchover, the other hosts, the old primary) and what is left."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, NamedTuple, Sequence

from tasks.adapters.ha.base import ClusterView
from tasks.adapters.packages import PackageState, compare_versions
from tasks.planning.plan import Action, ActionPlan
from tasks.planning.settings import SettingsPlanError, restart_order


class UpgradeStep(NamedTuple):
    """("upgrade", host) or ("switchover", the standby that becomes primary)."""

    action: Literal["upgrade", "switchover"]
    host: str


@dataclass(frozen=True)
class HostUpgrade:
    host: str
    # (package, installed version, target version), only the packages below their target.
    changes: tuple[tuple[str, str, str], ...]

    @property
    def targets(self) -> dict[str, str]:
        return {name: target for name, _, target in self.changes}

    def sentence(self) -> str:
        return ", ".join(f"{name} {old} → {new}" for name, old, new in self.changes)


def host_upgrades(targets: Mapping[str, str], states: Mapping[str, Mapping[str, PackageState]]
                  ) -> tuple[dict[str, HostUpgrade], list[str]]:
    """Per host, the requested packages it has installed below their target. A package is only
    upgraded where it is installed (a rolling upgrade installs nothing new), never downgraded,
    and only to a version the host's own package sources offer. Returns (upgrades, refusals)."""
    upgrades: dict[str, HostUpgrade] = {}
    refusals: list[str] = []
    installed_somewhere = set()
    for host in sorted(states):
        changes = []
        for name, target in targets.items():
            state = states[host].get(name)
            if state is None or state.installed is None:
                continue
            installed_somewhere.add(name)
            order = compare_versions(state.installed, target)
            if order == 0:
                continue
            if order > 0:
                refusals.append(f"packages.{name}: {host} runs {state.installed}, newer than {target}; "
                                "a rolling upgrade never downgrades")
            elif target not in state.available:
                offered = ", ".join(state.available) or "nothing"
                refusals.append(f"packages.{name}: {target} is not available on {host} (its sources offer {offered})")
            else:
                changes.append((name, state.installed, target))
        if changes:
            upgrades[host] = HostUpgrade(host, tuple(changes))
    for name in targets:
        if name not in installed_somewhere:
            refusals.append(f"packages.{name}: not installed on any host of the cluster")
    return upgrades, refusals


def readiness_refusals(*, caught_up: Mapping[str, bool], max_lag_bytes: int, oldest_transaction_s: float,
                       max_transaction_age_s: float, backup_problem: str | None, force: bool) -> list[str]:
    """Autobase's update checks: standbys caught up, no long transaction (the switchover would
    end it), and a recent good backup to fall back on; `force` waives only the backup."""
    refusals = [f"{host} lags more than max_lag_bytes={max_lag_bytes} behind the primary; upgrade a "
                "caught-up cluster" for host, ok in sorted(caught_up.items()) if not ok]
    if oldest_transaction_s > max_transaction_age_s:
        refusals.append(f"a transaction on the primary has been open {oldest_transaction_s:.0f}s, longer than "
                        f"max_transaction_age_seconds={max_transaction_age_s:.0f}; the switchover would end it")
    if backup_problem and not force:
        refusals.append(f"{backup_problem}; take a backup first (scheduled_basebackup force=True) or pass force=True")
    return refusals


def upgrade_order(view: ClusterView, caught_up: Mapping[str, bool],
                  upgrades: Mapping[str, HostUpgrade]) -> list[UpgradeStep]:
    """Database standbys one at a time in the rolling restart's order (least useful first), then,
    only when the primary needs the upgrade, a switchover to the best caught-up standby; then
    the hosts without PostgreSQL (backup server, routers), one at a time, while the old primary
    is still untouched; the old primary last, as a standby. Raises SettingsPlanError (its
    reasons) when the cluster is not healthy enough to roll through."""
    members = {m.name for m in view.members}
    primary = view.leader
    db_steps = restart_order(view, caught_up) if any(h in members for h in upgrades) else []
    others = [UpgradeStep("upgrade", h) for h in sorted(upgrades) if h not in members]
    standbys = [UpgradeStep("upgrade", s.host) for s in db_steps
                if s.action == "restart" and s.host != primary and s.host in upgrades]
    if primary not in upgrades:
        return standbys + others
    target = next(s.host for s in db_steps if s.action == "switchover")
    return standbys + [UpgradeStep("switchover", target)] + others + [UpgradeStep("upgrade", primary)]


def upgrade_plan(upgrades: Mapping[str, HostUpgrade], order: Sequence[UpgradeStep], *, primary: str | None,
                 db_hosts: Sequence[str], reboot: bool, approve_each_host: bool, drain: bool = False) -> ActionPlan:
    """The plan rolling_upgrade publishes: one line per host in order, what it gets and how it
    comes back; nothing to do when every host already runs its targets. `drain`: the HA manager
    can leave a database host out of promotion and of the synchronous role while it is down."""
    if not upgrades:
        return ActionPlan(nothing_to_do="Every host already runs the requested versions: nothing to upgrade.")
    back = "reboot it" if reboot else "restart the services whose package changed"
    ask = "after approval in the Prefect UI: " if approve_each_host else ""
    actions = []
    for step in order:
        if step.action == "switchover":
            actions.append(Action(step.host, f"switchover from {primary} to the best caught-up standby of that "
                                             f"moment (now {step.host})"))
            continue
        change = upgrades[step.host]
        if step.host == primary:
            role, wait = "the former primary, now a standby", "wait until it streams again"
        elif step.host in db_hosts:
            role, wait = "standby", "wait until it streams and is caught up"
        else:
            role, wait = "no PostgreSQL", "wait until its services run"
        if drain and step.host in db_hosts:
            actions.append(Action(step.host, f"{ask}{role}: drain it (not promoted, not synchronous); upgrade "
                                             f"{change.sentence()}; {back}; {wait}; count it in again"))
        else:
            actions.append(Action(step.host, f"{ask}{role}: upgrade {change.sentence()}; {back}; {wait}"))
    notes = ["A host that fails stops the run: the cluster keeps serving from the hosts not yet touched, "
             "and the failed host is named.",
             "Hosts are upgraded one at a time, so at most one etcd member is away at any moment."]
    return ActionPlan(tuple(actions), notes=tuple(notes))


def upgrade_leftovers(targets: Mapping[str, str], states: Mapping[str, Mapping[str, PackageState]]) -> list[str]:
    """After the roll: every host that has a requested package runs exactly its target."""
    return [f"{host}: {name} is {state.installed}, not {targets[name]}"
            for host in sorted(states) for name, state in sorted(states[host].items())
            if name in targets and state.installed is not None and state.installed != targets[name]]


def release_mix(tool: str, releases: Mapping[str, str | None]) -> str | None:
    """pgBackRest refuses to talk to another release of itself: one release on every host, or a problem."""
    seen = {release for release in releases.values() if release}
    if len(seen) <= 1:
        return None
    by_release = "; ".join(f"{release} on {', '.join(sorted(h for h, r in releases.items() if r == release))}"
                           for release in sorted(seen))
    return f"{tool} runs different releases: {by_release}"


__all__ = ["HostUpgrade", "SettingsPlanError", "UpgradeStep", "host_upgrades", "readiness_refusals",
           "release_mix", "upgrade_leftovers", "upgrade_order", "upgrade_plan"]
