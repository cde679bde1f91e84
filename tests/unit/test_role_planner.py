"""tasks/planning/roles.py: plan_switchover, plan_failover and the maintenance mode, table-driven."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tasks.planning.roles import (
    CandidateState,
    FailoverPlan,
    SwitchoverPlan,
    maintenance_plan,
    paused_refusals,
    plan_failover,
    plan_switchover,
    refuse_decided_candidate,
)

KNOWN = {"pg1", "pg2", "pg3"}
MAX_LAG = 1000


def cand(name: str, **kw: Any) -> CandidateState:
    base = dict(name=name, reachable=True, in_recovery=True, streaming=True, sync=False, lag_bytes=0,
                receive_lsn=1000, ha_healthy=True)
    base.update(kw)
    return CandidateState(**base)


def switchover(candidates: list[CandidateState], *, primary: str | None = "pg1", requested: str | None = None,
               synchronous: bool = False, oldest: float = 0.0, max_age: float = 300.0,
               known: set[str] | None = None) -> SwitchoverPlan:
    return plan_switchover(
        primary=primary, candidates=candidates, requested=requested, known_hosts=KNOWN if known is None else known,
        max_lag_bytes=MAX_LAG, oldest_transaction_s=oldest, max_transaction_age_s=max_age, synchronous=synchronous,
    )


PAIR = [cand("pg2", lag_bytes=10), cand("pg3", lag_bytes=20)]


# ----------------------------------------------------------------------------- switchover: early refusals


def test_no_primary_is_a_failover_not_a_switchover() -> None:
    plan = switchover(PAIR, primary=None, requested="pg2")
    assert plan == SwitchoverPlan(None, ("no healthy primary: this is a failover, not a switchover",))
    assert plan.already_done is False


@pytest.mark.parametrize("requested", ["pg9", "PG2", "", "backup1"])
def test_unknown_requested_host_is_refused_and_lists_known_hosts(requested: str) -> None:
    plan = switchover(PAIR, requested=requested)
    assert plan.candidate is None
    assert plan.already_done is False
    assert plan.refusals == (
        f"candidate: {requested!r} is not a database host of this cluster (pg1, pg2, pg3)",
    )


def test_known_host_the_ha_manager_does_not_know_is_refused() -> None:
    # pg3 is a db host of the inventory, but the HA manager reports no member pg3.
    plan = switchover([cand("pg2")], requested="pg3")
    assert plan == SwitchoverPlan(None, ("candidate: pg3 is not a member the HA manager knows",))


@pytest.mark.parametrize("candidates", [[], PAIR, [cand("pg2", reachable=False), cand("pg3", streaming=False)]])
def test_requested_is_the_primary_is_already_done(candidates: list[CandidateState]) -> None:
    plan = switchover(candidates, primary="pg2", requested="pg2", oldest=10_000.0, synchronous=True)
    assert plan == SwitchoverPlan("pg2", (), already_done=True)


# ----------------------------------------------------------------------------- switchover: automatic choice


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        pytest.param([cand("pg2", lag_bytes=10), cand("pg3", lag_bytes=5)], "pg3", id="least-lag"),
        pytest.param([cand("pg3", lag_bytes=7), cand("pg2", lag_bytes=7)], "pg2", id="tie-break-by-name"),
        pytest.param([cand("pg2", lag_bytes=0, reachable=False), cand("pg3", lag_bytes=500)], "pg3",
                     id="skips-unreachable"),
        pytest.param([cand("pg2", lag_bytes=0, ha_healthy=False), cand("pg3", lag_bytes=500)], "pg3",
                     id="skips-ha-unhealthy"),
        pytest.param([cand("pg2", lag_bytes=0, in_recovery=False), cand("pg3", lag_bytes=500)], "pg3",
                     id="skips-not-in-recovery"),
        pytest.param([cand("pg2", lag_bytes=0, streaming=False), cand("pg3", lag_bytes=500)], "pg3",
                     id="skips-not-streaming"),
        pytest.param([cand("pg2", lag_bytes=None), cand("pg3", lag_bytes=500)], "pg3", id="skips-unknown-lag"),
        pytest.param([cand("pg1", lag_bytes=0), cand("pg2", lag_bytes=3), cand("pg3", lag_bytes=4)], "pg2",
                     id="never-the-primary-itself"),
    ],
)
def test_auto_choice_least_lag_healthy_streaming(candidates: list[CandidateState], expected: str) -> None:
    plan = switchover(candidates)
    assert plan == SwitchoverPlan(expected, ())


@pytest.mark.parametrize(
    "candidates",
    [
        [],
        [cand("pg2", reachable=False), cand("pg3", streaming=False)],
        [cand("pg2", lag_bytes=None), cand("pg3", ha_healthy=False)],
        [cand("pg1")],  # only the primary
    ],
)
def test_auto_choice_without_eligible_standby(candidates: list[CandidateState]) -> None:
    assert switchover(candidates) == SwitchoverPlan(None, ("no healthy streaming standby to switch over to",))


def test_auto_choice_lag_over_limit_is_refused_naming_it() -> None:
    plan = switchover([cand("pg2", lag_bytes=MAX_LAG + 1), cand("pg3", lag_bytes=MAX_LAG + 5)])
    assert plan.candidate == "pg2"
    assert plan.refusals == (f"candidate: pg2 lags {MAX_LAG + 1} bytes, more than {MAX_LAG}",)


def test_lag_exactly_at_limit_is_allowed() -> None:
    assert switchover([cand("pg2", lag_bytes=MAX_LAG)]) == SwitchoverPlan("pg2", ())


# ----------------------------------------------------------------------------- switchover: synchronous mode


@pytest.mark.parametrize(
    ("candidates", "synchronous", "expected"),
    [
        pytest.param([cand("pg2", lag_bytes=0), cand("pg3", lag_bytes=50, sync=True)], True, "pg3",
                     id="sync-preferred-over-less-lag"),
        pytest.param([cand("pg2", lag_bytes=0), cand("pg3", lag_bytes=50, sync=True)], False, "pg2",
                     id="async-mode-ignores-sync-flag"),
        pytest.param([cand("pg2", lag_bytes=9, sync=True), cand("pg3", lag_bytes=1, sync=True)], True, "pg3",
                     id="least-lag-among-sync"),
        pytest.param([cand("pg2", lag_bytes=9), cand("pg3", lag_bytes=1)], True, "pg3", id="no-sync-at-all"),
    ],
)
def test_synchronous_auto_choice(candidates: list[CandidateState], synchronous: bool, expected: str) -> None:
    assert switchover(candidates, synchronous=synchronous) == SwitchoverPlan(expected, ())


def test_synchronous_refuses_non_sync_requested_while_sync_exists() -> None:
    plan = switchover([cand("pg2", lag_bytes=0), cand("pg3", sync=True)], requested="pg2", synchronous=True)
    assert plan.candidate == "pg2"
    assert plan.refusals == (
        "candidate: pg2 is not the synchronous standby; switching to it could lose commits",
    )


@pytest.mark.parametrize(
    ("candidates", "synchronous"),
    [
        pytest.param([cand("pg2"), cand("pg3", sync=True)], False, id="async-mode"),
        pytest.param([cand("pg2"), cand("pg3")], True, id="no-sync-standby"),
        pytest.param([cand("pg2", sync=True), cand("pg3")], True, id="requested-is-sync"),
    ],
)
def test_requested_allowed_in_these_sync_situations(candidates: list[CandidateState], synchronous: bool) -> None:
    assert switchover(candidates, requested="pg2", synchronous=synchronous) == SwitchoverPlan("pg2", ())


def test_sync_unhealthy_auto_falls_back_to_async_and_refuses() -> None:
    # The sync standby is not eligible; the async one is chosen but still refused.
    plan = switchover([cand("pg2", lag_bytes=0), cand("pg3", sync=True, reachable=False)], synchronous=True)
    assert plan.candidate == "pg2"
    assert plan.refusals == (
        "candidate: pg2 is not the synchronous standby; switching to it could lose commits",
    )


# ----------------------------------------------------------------------------- switchover: requested candidate checks


@pytest.mark.parametrize(
    ("override", "refusal"),
    [
        pytest.param({"reachable": False}, "candidate: pg2 is not healthy (reachable=False, in recovery=True, "
                     "HA manager healthy=True)", id="unreachable"),
        pytest.param({"in_recovery": False}, "candidate: pg2 is not healthy (reachable=True, in recovery=False, "
                     "HA manager healthy=True)", id="not-in-recovery"),
        pytest.param({"ha_healthy": False}, "candidate: pg2 is not healthy (reachable=True, in recovery=True, "
                     "HA manager healthy=False)", id="ha-unhealthy"),
        pytest.param({"streaming": False}, "candidate: pg2 is not streaming from pg1", id="not-streaming"),
        pytest.param({"lag_bytes": MAX_LAG + 1}, f"candidate: pg2 lags {MAX_LAG + 1} bytes, more than {MAX_LAG}",
                     id="lag-over-limit"),
        pytest.param({"lag_bytes": None}, f"candidate: pg2 lags None bytes, more than {MAX_LAG}", id="lag-unknown"),
    ],
)
def test_requested_candidate_problem_is_refused_naming_it(override: dict, refusal: str) -> None:
    plan = switchover([cand("pg2", **override), cand("pg3")], requested="pg2")
    assert plan.candidate == "pg2"
    assert plan.already_done is False
    assert plan.refusals == (refusal,)


def test_unhealthy_wins_over_not_streaming_and_lag() -> None:
    # Only the first failing health check is reported.
    plan = switchover([cand("pg2", reachable=False, streaming=False, lag_bytes=None)], requested="pg2")
    assert len(plan.refusals) == 1
    assert plan.refusals[0].startswith("candidate: pg2 is not healthy")


@pytest.mark.parametrize(
    ("oldest", "max_age", "refused"),
    [
        (0.0, 300.0, False),
        (300.0, 300.0, False),
        (300.4, 300.0, True),
        (3600.0, 300.0, True),
    ],
)
def test_long_open_transaction(oldest: float, max_age: float, refused: bool) -> None:
    plan = switchover(PAIR, requested="pg2", oldest=oldest, max_age=max_age)
    assert plan.candidate == "pg2"
    expected = (f"a transaction on pg1 has been open {oldest:.0f}s (limit {max_age:.0f}s); it would be cut off",)
    assert plan.refusals == (expected if refused else ())


def test_refusals_accumulate() -> None:
    plan = switchover([cand("pg2", streaming=False), cand("pg3", sync=True)], requested="pg2", synchronous=True,
                      oldest=900.0, max_age=60.0)
    assert plan.candidate == "pg2"
    assert plan.refusals == (
        "candidate: pg2 is not streaming from pg1",
        "candidate: pg2 is not the synchronous standby; switching to it could lose commits",
        "a transaction on pg1 has been open 900s (limit 60s); it would be cut off",
    )


# ----------------------------------------------------------------------------- failover


def failover(candidates: list[CandidateState], *, alive: bool = False, force: bool = False) -> FailoverPlan:
    return plan_failover(primary_alive=alive, candidates=candidates, force=force, max_lag_bytes=MAX_LAG)


def test_healthy_primary_without_force_is_refused() -> None:
    plan = failover(PAIR, alive=True, force=False)
    assert plan == FailoverPlan(None, ("a healthy primary exists; use switchover, or force=True",), False,
                                "the primary is healthy")


def test_force_with_healthy_primary_gives_a_candidate() -> None:
    plan = failover([cand("pg2", receive_lsn=100, lag_bytes=10), cand("pg3", receive_lsn=200, lag_bytes=5)],
                    alive=True, force=True)
    assert plan == FailoverPlan("pg3", (), False, "pg3 is the most advanced standby", 5)


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        pytest.param([cand("pg2", receive_lsn=300), cand("pg3", receive_lsn=200)], "pg2", id="highest-lsn-first"),
        pytest.param([cand("pg2", receive_lsn=200), cand("pg3", receive_lsn=300)], "pg3", id="highest-lsn-last"),
        pytest.param([cand("pg2", receive_lsn=500, reachable=False), cand("pg3", receive_lsn=300)], "pg3",
                     id="unreachable-excluded"),
        pytest.param([cand("pg2", receive_lsn=500, in_recovery=False), cand("pg3", receive_lsn=300)], "pg3",
                     id="not-in-recovery-excluded"),
        pytest.param([cand("pg2", receive_lsn=None), cand("pg3", receive_lsn=1)], "pg3", id="unknown-lsn-excluded"),
        pytest.param([cand("pg2", receive_lsn=300, ha_healthy=False), cand("pg3", receive_lsn=300)], "pg3",
                     id="tie-prefers-ha-healthy"),
        pytest.param([cand("pg2", receive_lsn=300, ha_healthy=False, streaming=False)], "pg2",
                     id="ha-unhealthy-still-promotable"),
    ],
)
def test_failover_promotes_most_advanced(candidates: list[CandidateState], expected: str) -> None:
    plan = failover(candidates)
    assert plan.candidate == expected
    assert plan.refusals == ()
    assert plan.needs_human is False
    assert plan.reason == f"{expected} is the most advanced standby"
    assert plan.candidate_lag == 0


@pytest.mark.parametrize(
    ("lag", "needs_human", "reason"),
    [
        (0, False, "pg2 is the most advanced standby"),
        (MAX_LAG, False, "pg2 is the most advanced standby"),
        (MAX_LAG + 1, True, f"the most advanced standby pg2 lags {MAX_LAG + 1} bytes behind the last known primary "
                            f"position (limit {MAX_LAG}): promoting it may lose data"),
        (None, True, "the most advanced standby pg2 lags an unknown number of bytes behind the last known primary "
                     f"position (limit {MAX_LAG}): promoting it may lose data"),
    ],
)
def test_failover_lag_limit(lag: int | None, needs_human: bool, reason: str) -> None:
    plan = failover([cand("pg2", receive_lsn=900, lag_bytes=lag), cand("pg3", receive_lsn=100, lag_bytes=0)])
    assert plan == FailoverPlan("pg2", (), needs_human, reason, lag)


@pytest.mark.parametrize(
    "candidates",
    [
        [],
        [cand("pg2", reachable=False), cand("pg3", reachable=False)],
        [cand("pg2", in_recovery=False), cand("pg3", receive_lsn=None)],
    ],
)
@pytest.mark.parametrize(("alive", "force"), [(False, False), (True, True)])
def test_failover_no_reachable_standby(candidates: list[CandidateState], alive: bool, force: bool) -> None:
    plan = failover(candidates, alive=alive, force=force)
    assert plan == FailoverPlan(None, ("no reachable standby to promote",), False, "nothing to promote")


def test_candidate_state_is_frozen() -> None:
    c = cand("pg2")
    with pytest.raises(Exception):
        c.lag_bytes = 5  # type: ignore[misc]
    assert replace(c, lag_bytes=5).lag_bytes == 5


# ------------------------------------------------------------------ the DBA's failover decision

@pytest.mark.parametrize(
    ("decided", "primary_alive", "force", "candidates", "refused"),
    [
        ("pg2", False, False, [cand("pg2"), cand("pg3")], ""),
        ("pg3", False, False, [cand("pg2"), cand("pg3", lag_bytes=10**9)], ""),  # less advanced: the DBA's call
        ("pg2", True, False, [cand("pg2")], "the primary is back"),
        ("pg2", True, True, [cand("pg2")], ""),  # a forced failover away from a live primary
        ("pg9", False, False, [cand("pg2")], "candidate: 'pg9' is not a database host of this cluster (pg1, pg2, pg3)"),
        ("pg3", False, False, [cand("pg2")], "candidate: pg3 is not a standby the HA manager knows"),
        ("pg1", True, True, [cand("pg2")], "candidate: pg1 is not a standby the HA manager knows"),
        ("pg2", False, False, [cand("pg2", reachable=False)], "candidate: pg2 cannot be promoted (reachable=False"),
        ("pg2", False, False, [cand("pg2", in_recovery=False)], "in recovery=False"),
        ("pg2", False, False, [cand("pg2", receive_lsn=None)], "candidate: pg2 cannot be promoted"),
    ],
)
def test_decided_candidate_is_checked_like_the_preflight(decided: str, primary_alive: bool, force: bool,
                                                         candidates: list[CandidateState], refused: str) -> None:
    refusals = refuse_decided_candidate(decided=decided, primary_alive=primary_alive, force=force,
                                        candidates=candidates, known_hosts={"pg1", "pg2", "pg3"})
    if not refused:
        assert refusals == ()
    else:
        assert len(refusals) == 1 and refused in refusals[0]


# ------------------------------------------------------------------ maintenance mode (pause_ha / resume_ha)

@pytest.mark.parametrize(("paused", "while_paused", "refused"), [
    (False, False, False), (False, True, False), (True, True, False), (True, False, True),
])
def test_a_role_change_while_paused_needs_saying_so(paused, while_paused, refused):
    refusals = paused_refusals(paused=paused, while_paused=while_paused, runbook="failover")
    assert bool(refusals) is refused
    if refused:
        assert refusals[0].startswith("while_paused: the HA manager is paused")
        assert "resume_ha first, or run the failover with while_paused=True" in refusals[0]


HEALTHY = [("pg1", "primary", True), ("pg2", "replica", True)]


@pytest.mark.parametrize(("supported", "paused", "pause", "members", "rows", "refusal", "notes"), [
    (True, False, True, HEALTHY, ["pause patroni: no automatic failover until resume_ha"], None,
     ["While paused, a primary that fails stays down"]),
    (True, True, True, HEALTHY, [], None, []),
    (True, False, False, HEALTHY, [], None, []),
    (True, True, False, HEALTHY, ["resume patroni: automatic failover on again"], None, []),
    (True, True, False, [("pg1", "primary", True), ("pg2", "replica", False)],
     ["resume patroni: automatic failover on again"], None, ["pg2 is not healthy now"]),
    (True, True, False, [("pg1", "unknown", False), ("pg2", "replica", True), ("pg3", "replica", False)],
     ["resume patroni: automatic failover on again"], None, ["pg1, pg3 are not healthy now", "No healthy primary"]),
    (False, False, True, HEALTHY, [], "has no maintenance mode", []),
    (False, False, False, HEALTHY, [], "has no maintenance mode", []),
], ids=["pause", "pause-again", "resume-running", "resume", "resume-unhealthy-standby", "resume-no-primary",
        "stolon-pause", "stolon-resume"])
def test_maintenance_plan(supported, paused, pause, members, rows, refusal, notes):
    plan = maintenance_plan(driver="patroni" if supported else "stolon", supported=supported, paused=paused,
                            pause=pause, members=members)
    assert [r["plan"] for r in plan.rows()] == rows
    if refusal:
        assert len(plan.refusals) == 1 and refusal in plan.refusals[0] and not plan.is_noop
    else:
        assert plan.refusals == ()
    assert plan.is_noop is (not rows and not refusal)
    assert len(plan.notes) == len(notes) and all(n in note for n, note in zip(notes, plan.notes))
