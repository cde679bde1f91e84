"""Deployment wiring that needs no server: entrypoints, schedules, the CLI's new subcommands."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_every_flow_has_a_repo_relative_entrypoint_that_names_the_flow():
    from deployments.deploy import entrypoint
    from flows.registry import FLOWS

    for name in FLOWS:
        path, _, attr = entrypoint(name).partition(":")
        assert not Path(path).is_absolute()
        assert f"def {attr}(" in (REPO / path).read_text(), entrypoint(name)


def test_schedules_are_amsterdam_wall_clock_and_tab_jobs_carry_their_job():
    from deployments.deploy import SCHEDULES, schedules_for
    from flows.registry import FLOWS

    assert set(SCHEDULES) <= set(FLOWS)
    basebackup, = schedules_for("scheduled_basebackup")
    assert (basebackup.cron, basebackup.timezone, basebackup.active) == ("0 1 * * *", "Europe/Amsterdam", True)
    drill, = schedules_for("restore_drill", active=False)
    assert (drill.cron, drill.active) == ("0 3 * * 0", False)
    for tab in schedules_for("tab_job"):
        assert tab.timezone == "Europe/Amsterdam"
        assert (REPO / "deployments" / "jobs" / f"{tab.parameters['job']}.yml").is_file()
    assert schedules_for("switchover") == []
    slugs = [s.slug for specs in SCHEDULES.values() for s in specs]
    assert len(slugs) == len(set(slugs))


@pytest.mark.parametrize("argv", [
    ["deploy", "--cluster", "prod", "--paused-schedules"],
    ["worker", "start", "--name", "w2", "--limit", "2"],
    ["worker", "stop"],
    ["worker", "stop", "--all"],
    ["ticket", "run", "switchover", "--deployment", "lab", "--ticket", "CHG-1", "--param", "candidate=pg2", "--wait"],
    ["ticket", "status", "6f1c0000-0000-0000-0000-000000000000"],
    ["ticket", "proxy", "start"],
    ["ticket", "proxy", "stop"],
])
def test_cli_parses_the_deployment_subcommands(argv):
    from bouwsteen.cli import build_parser

    args = build_parser().parse_args(argv)
    assert callable(args.handler)


def test_ticket_run_requires_deployment_and_ticket():
    from bouwsteen.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["ticket", "run", "check_hosts", "--ticket", "CHG-1"])


@pytest.mark.parametrize("cron", ["0 1 * * *", "30 2 * * *", "0 3 * * sun", "*/15 1-5 * jan mon-fri"])
def test_valid_cron_expressions_pass(cron):
    from deployments.deploy import validate_cron

    assert validate_cron(cron) == cron


@pytest.mark.parametrize("cron", ["61 1 * * *", "0 1 * *", "every night", "0 0 * * * *", "@daily", ""])
def test_invalid_cron_expressions_are_refused_with_the_expression(cron):
    from deployments.deploy import validate_cron

    with pytest.raises(ValueError, match="cron expression"):
        validate_cron(cron)
