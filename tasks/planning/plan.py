"""What every planner returns: a plan that can be published, refused, or found to change nothing.

`flows.runbook.publish_plan` takes any `Plan`: the build plans (files, packages, units per host)
and the action plans of the runbooks that act on roles, backups, drills and jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@runtime_checkable
class Plan(Protocol):
    refusals: tuple[str, ...]

    @property
    def is_noop(self) -> bool:
        """Nothing to change (and nothing refused): a second run of a converged runbook."""

    @property
    def noop_summary(self) -> str:
        """One sentence for the log and the artifact when the plan changes nothing."""

    def rows(self) -> list[dict]:
        """One {"host", "plan"} row per action, for the log and the flow's result."""

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        """Header and cells of the plan artifact's table (paths, never contents)."""

    def remarks(self) -> list[str]:
        """Sentences the artifact adds after the table."""


@dataclass(frozen=True)
class Action:
    host: str
    plan: str


@dataclass(frozen=True)
class ActionPlan:
    """The plan of a runbook that acts rather than converges files: role changes, a backup, a drill,
    a TAB job. No actions and no refusals: nothing to do, and `nothing_to_do` says why."""

    actions: tuple[Action, ...] = ()
    refusals: tuple[str, ...] = ()
    nothing_to_do: str = "Nothing to do."
    notes: tuple[str, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not self.refusals and not self.actions

    @property
    def noop_summary(self) -> str:
        return self.nothing_to_do

    def rows(self) -> list[dict]:
        return [{"host": a.host, "plan": a.plan} for a in self.actions]

    def table(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        return ("host", "plan"), [(a.host, a.plan) for a in self.actions]

    def remarks(self) -> list[str]:
        return list(self.notes)



@dataclass(frozen=True)
class PlannedCheck:
    """A pre-flight step's answer that carries the plan it published (a `plan` field of the
    subclass): ok when the plan refuses nothing."""

    ok: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", not self.plan.refusals)  # type: ignore[attr-defined]

    def __bool__(self) -> bool:
        return self.ok
