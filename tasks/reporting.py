"""Markdown for plan and report artifacts. Never given secrets: plans carry paths, not contents."""

from __future__ import annotations

from tasks.planning.build import BuildPlan


def plan_markdown(runbook: str, cluster: str, plan: BuildPlan, dry_run: bool) -> str:
    lines = [f"# {runbook} plan for cluster `{cluster}`", ""]
    if plan.refusals:
        lines += ["**Refused — nothing will be changed:**", ""] + [f"- {r}" for r in plan.refusals] + [""]
    if plan.is_noop:
        lines += ["Every host already matches the inventory: **no changes**.", ""]
    lines += ["| host | install | write | start | restart | reload |", "|---|---|---|---|---|---|"]
    for host in plan.hosts:
        files = "<br>".join(f"`{f.path}` ({f.action}{', secret' if f.secret else ''})" for f in host.files)
        lines.append(
            f"| {host.host} | {', '.join(host.install) or '—'} | {files or '—'} | {', '.join(host.start) or '—'} "
            f"| {', '.join(host.restart) or '—'} | {', '.join(host.reload) or '—'} |"
        )
    if plan.bootstrap_on:
        lines += ["", f"The cluster is not initialised yet: the HA manager on **{plan.bootstrap_on}** initialises it."]
    if dry_run:
        lines += ["", "_dry_run: nothing was changed._"]
    return "\n".join(lines) + "\n"
