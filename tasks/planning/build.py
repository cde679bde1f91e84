"""Pure planning for build_cluster and add_standby: snapshot of the hosts in, plan out.

No I/O. The flows take snapshots, call these functions, show the plan, and only then act.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from tasks.adapters.commands import ManagedFile, Unit
from tasks.adapters.probe import MARKER_PATH, HostSnapshot

SUPPORTED_OS = {("debian", "12")}


def marker_file(cluster: str) -> ManagedFile:
    return ManagedFile(MARKER_PATH, json.dumps({"cluster": cluster}) + "\n", owner="root", mode=0o644)


@dataclass(frozen=True)
class DesiredHost:
    """What one host should look like: packages, files and units, in start order."""

    host: str
    packages: tuple[str, ...]
    files: tuple[ManagedFile, ...]
    units: tuple[Unit, ...]
    # Port -> who may legitimately listen on it (process names as `ss` shows them); any other
    # listener there is someone else's service and refuses the host.
    ports: dict[int, frozenset[str]] = field(default_factory=dict)
    # A member carries the cluster's marker and (if a database host) its data directory; a backup
    # server or router serves clusters without belonging to one.
    cluster_member: bool = False
    needs_data_dir: bool = False  # PostgreSQL runs here: its data directory must be empty or ours
    release_floors: tuple[ReleaseFloor, ...] = ()


@dataclass(frozen=True)
class ReleaseFloor:
    """The oldest release of a tool this building block may run, and the reason it is the floor."""

    tool: str
    minimum: str
    reason: str


def parse_release(text: str | None) -> tuple[int, ...] | None:
    """`patroni 4.0.7` -> (4, 0, 7); None when the text carries no dotted release number."""
    match = re.search(r"(\d+(?:\.\d+)+)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def release_problem(host: str, floor: ReleaseFloor, version_text: str | None) -> str | None:
    """A refusal when the installed release is known and older than the floor; None otherwise."""
    found = parse_release(version_text)
    if found is None:
        return None
    wanted = parse_release(floor.minimum) or ()
    width = max(len(found), len(wanted))
    if found + (0,) * (width - len(found)) >= wanted + (0,) * (width - len(wanted)):
        return None
    return (f"{host}: {floor.tool} {'.'.join(map(str, found))} is older than {floor.minimum}, the oldest release "
            f"this building block runs: {floor.reason}")


@dataclass(frozen=True)
class FileChange:
    path: str
    action: str  # create | update | fix owner/mode
    secret: bool


@dataclass(frozen=True)
class HostPlan:
    host: str
    install: tuple[str, ...] = ()
    files: tuple[FileChange, ...] = ()
    start: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    reload: tuple[str, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not (self.install or self.files or self.start or self.restart or self.reload)

    def summary(self) -> str:
        if self.is_noop:
            return "no change"
        parts = []
        if self.install:
            parts.append("install " + ", ".join(self.install))
        if self.files:
            parts.append("write " + ", ".join(f"{f.path} ({f.action})" for f in self.files))
        if self.start:
            parts.append("start " + ", ".join(self.start))
        if self.restart:
            parts.append("restart " + ", ".join(self.restart))
        if self.reload:
            parts.append("reload " + ", ".join(self.reload))
        return "; ".join(parts)


@dataclass(frozen=True)
class BuildPlan:
    hosts: tuple[HostPlan, ...]
    refusals: tuple[str, ...] = ()
    bootstrap_on: str | None = None  # host that initialises the cluster, when it is not initialised yet
    notes: tuple[str, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not self.refusals and self.bootstrap_on is None and all(h.is_noop for h in self.hosts)

    def for_host(self, name: str) -> HostPlan:
        return next(h for h in self.hosts if h.host == name)

    def rows(self) -> list[dict]:
        rows = [{"host": h.host, "plan": h.summary()} for h in self.hosts]
        if self.bootstrap_on:
            rows.append({"host": self.bootstrap_on, "plan": "initialise the cluster here (first primary)"})
        return rows

    # The rest of the `Plan` protocol (tasks/planning/plan.py).
    noop_summary = "Every host already matches the inventory: **no changes**."

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        cells = []
        for h in self.hosts:
            files = "<br>".join(f"`{f.path}` ({f.action}{', secret' if f.secret else ''})" for f in h.files)
            cells.append((h.host, ", ".join(h.install) or "—", files or "—", ", ".join(h.start) or "—",
                          ", ".join(h.restart) or "—", ", ".join(h.reload) or "—"))
        return ("host", "install", "write", "start", "restart", "reload"), cells

    def remarks(self) -> list[str]:
        lines = list(self.notes)
        if self.bootstrap_on:
            lines.append(f"The cluster is not initialised yet: the HA manager on **{self.bootstrap_on}** initialises it.")
        return lines


def file_changes(desired: tuple[ManagedFile, ...], snap: HostSnapshot) -> tuple[FileChange, ...]:
    changes = []
    for spec in desired:
        current = snap.files.get(spec.path)
        if current is None:
            changes.append(FileChange(spec.path, "create", spec.secret))
        elif current.sha256 != spec.sha256:
            changes.append(FileChange(spec.path, "update", spec.secret))
        elif current.owner != f"{spec.owner}:{spec.owner_group}" or current.mode != spec.mode:
            changes.append(FileChange(spec.path, "fix owner/mode", spec.secret))
    return tuple(changes)


def host_preflight(
    cluster: str, want: DesiredHost, snap: HostSnapshot, *, adopt_existing: bool, allow_join: bool = True
) -> list[str]:
    """Reasons to refuse touching this host at all; each names the host and what is wrong."""
    refusals = []
    name = want.host
    if (snap.os_id, snap.os_version) not in SUPPORTED_OS:
        refusals.append(f"{name}: unsupported OS {snap.os_pretty or snap.os_id + ' ' + snap.os_version!r} (need Debian 12)")
    if snap.hostname.split(".")[0] != name:
        refusals.append(f"{name}: answers as {snap.hostname!r}; the inventory address may point at another machine")
    ours = snap.marker_cluster == cluster
    # Only database/etcd hosts carry a cluster marker; a backup server or router may serve many.
    if want.cluster_member and snap.marker_cluster is not None and not ours:
        refusals.append(f"{name}: already belongs to cluster {snap.marker_cluster!r}")
    if want.needs_data_dir and not ours and not snap.data_dir.is_empty and not adopt_existing:
        refusals.append(
            f"{name}: data directory is not empty ({snap.data_dir.entries} entries"
            f"{', PostgreSQL ' + snap.data_dir.pg_version if snap.data_dir.pg_version else ''}) and the host is not part "
            f"of cluster {cluster!r}; refusing to overwrite it (pass adopt_existing=True to take it over)"
        )
    # Hosts without a data directory (object store, routers) carry no cluster marker: a shared
    # backup server serves many clusters. There the process name alone says whether it is ours.
    trust_process = ours or not want.cluster_member
    for port, owners in sorted(want.ports.items()):
        process = snap.listeners.get(port)
        if process is None:
            continue
        if not trust_process or process not in owners:
            refusals.append(f"{name}: port {port} is already in use by {process or 'an unknown process'}")
    if not allow_join and not ours:
        refusals.append(f"{name}: not part of cluster {cluster!r}")
    for floor in want.release_floors:
        problem = release_problem(name, floor, snap.tools.get(floor.tool))
        if problem:
            refusals.append(problem)
    return refusals


def plan_host(want: DesiredHost, snap: HostSnapshot) -> HostPlan:
    install = tuple(p for p in want.packages if not snap.packages.get(p))
    changes = file_changes(want.files, snap)
    changed_paths = {c.path for c in changes if c.action != "fix owner/mode"}
    start, restart, reload = [], [], []
    for unit in want.units:
        state = snap.units.get(unit.name)
        if state is None or not state.is_running or not state.is_enabled:
            start.append(unit.name)
        elif changed_paths & set(unit.restart_on):
            restart.append(unit.name)
        elif changed_paths & set(unit.reload_on):
            reload.append(unit.name)
    return HostPlan(want.host, install, changes, tuple(start), tuple(restart), tuple(reload))


def merge_host_plans(plans: list[HostPlan]) -> HostPlan:
    """One row per host when a host carries several layers (etcd member and database)."""
    def unique(items):
        return tuple(dict.fromkeys(items))

    seen_paths: set[str] = set()
    files = []
    for plan in plans:
        for change in plan.files:
            if change.path not in seen_paths:
                seen_paths.add(change.path)
                files.append(change)
    return HostPlan(
        host=plans[0].host,
        install=unique(p for plan in plans for p in plan.install),
        files=tuple(files),
        start=unique(u for plan in plans for u in plan.start),
        restart=unique(u for plan in plans for u in plan.restart),
        reload=unique(u for plan in plans for u in plan.reload),
    )


def plan_build(
    cluster: str,
    desired: list[DesiredHost],
    snapshots: dict[str, HostSnapshot],
    *,
    initialized: bool,
    bootstrap_candidates: list[str],
    adopt_existing: bool = False,
    refusals: list[str] | None = None,
    unreachable: dict[str, str] | None = None,
) -> BuildPlan:
    """Layers of the same host are merged into one HostPlan, in first-seen host order.

    `unreachable`: why a host has no snapshot (the probe's refusal), said once in its place."""
    found: list[str] = list(refusals or [])
    per_host: dict[str, list[HostPlan]] = {}
    for want in desired:
        snap = snapshots.get(want.host)
        if snap is None:
            reason = (unreachable or {}).get(want.host) or f"{want.host}: no snapshot (unreachable?)"
            if reason not in found:
                found.append(reason)
            continue
        for reason in host_preflight(cluster, want, snap, adopt_existing=adopt_existing):
            if reason not in found:
                found.append(reason)
        per_host.setdefault(want.host, []).append(plan_host(want, snap))
    bootstrap_on = None
    if not initialized:
        if not bootstrap_candidates:
            found.append("no database host can initialise the cluster")
        else:
            # Prefer a host that already has data (a half-finished earlier run), then inventory order.
            with_data = [h for h in bootstrap_candidates if h in snapshots and not snapshots[h].data_dir.is_empty]
            bootstrap_on = (with_data or bootstrap_candidates)[0]
    hosts = tuple(merge_host_plans(plans) for plans in per_host.values())
    return BuildPlan(hosts, tuple(found), bootstrap_on)
