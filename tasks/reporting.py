"""Markdown for plan and report artifacts. Never given secrets: plans carry paths, not contents."""

from __future__ import annotations

from tasks.planning.plan import Plan


def plan_markdown(runbook: str, cluster: str, plan: Plan, dry_run: bool) -> str:
    lines = [f"# {runbook} plan for cluster `{cluster}`", ""]
    if plan.refusals:
        lines += ["**Refused — nothing will be changed:**", ""] + [f"- {r}" for r in plan.refusals] + [""]
    if plan.is_noop:
        lines += [plan.noop_summary, ""]
    header, cells = plan.table()
    if cells or not plan.is_noop:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    remarks = plan.remarks()
    if remarks:
        lines += [""] + remarks
    if dry_run:
        lines += ["", "_dry_run: nothing was changed._"]
    return "\n".join(lines) + "\n"
