"""Bad-input corpus: one test per input family. Each error names the field; no host changes."""

from __future__ import annotations

import pytest
import yaml
from labtools import bouwsteen, cluster_state_digest

HOSTS = ("pg1", "pg2", "pg3", "restore1", "router1", "backup1")


@pytest.fixture
def unchanged(lab):
    before = cluster_state_digest(lab, HOSTS)
    yield
    assert cluster_state_digest(lab, HOSTS) == before, "a refused run changed a host"


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["hosts"].append(dict(d["hosts"][0])), "duplicate host 'pg1'"),
    (lambda d: d["hosts"][0].update(roles=["database"]), "hosts[0].roles[0]"),
    (lambda d: d["hosts"][0].update(address="172.29.66.300"), "hosts[0].address"),
    (lambda d: d["cluster"].update(ha_manager="repmgr"), "cluster.ha_manager"),
    (lambda d: d["cluster"]["routing"].update(vip="10.1.2.3"), "cluster.routing.vip"),
    (lambda d: [h.update(roles=[]) for h in d["hosts"][1:3]], "etcd member"),
    (lambda d: d["cluster"].update(colour="blue"), "cluster.colour"),
])
def test_inventory_yaml(lab, registered, tmp_path, unchanged, mutate, needle):
    document = yaml.safe_load(lab.paths.inventory.read_text())
    mutate(document)
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(document))
    result = bouwsteen("run", "build_cluster", "--inventory", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(path) in result.stderr and needle in result.stderr, result.stderr


@pytest.mark.parametrize("args, needle", [
    (["run", "switchover", "--cluster", "lab", "--param", "candidate=pg42"], "not a database host"),
    (["run", "add_standby", "--cluster", "lab", "--param", "host=pg42"], "unknown host 'pg42'"),
    (["run", "build_cluster", "--cluster", "lab", "--param", "colour=blue"], "no parameter(s) colour"),
    (["run", "scheduled_basebackup", "--cluster", "lab", "--param", "keep_full=0"], "keep_full"),
    (["run", "check_hosts", "--cluster", "no-such-cluster"], "no cluster-inventory block named 'no-such-cluster'"),
])
def test_flow_parameters(cluster, unchanged, args, needle):
    result = bouwsteen(*args)
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.fixture
def scratch_jobs(registered, tmp_path):
    """A job source `scratch` (tmp_path) in the lab's inventory block, for this test only: a run
    may only pick sources the cluster's configuration names."""
    from blocks.inventory import Inventory
    from blocks.prefect_blocks import ClusterInventory

    stored = ClusterInventory.load("lab").inventory
    document = stored.model_dump(mode="json")
    document["cluster"]["jobs"]["sources"]["scratch"] = {"directory": str(tmp_path)}
    ClusterInventory(inventory=Inventory.model_validate(document)).save("lab", overwrite=True)
    try:
        yield tmp_path
    finally:
        ClusterInventory(inventory=stored).save("lab", overwrite=True)


@pytest.mark.parametrize("job, body, needle", [
    ("broken", "parallel: 0\nsteps:\n  a:\n    depends: [nowhere]\n    commands: [{name: x, inline: 'true'}]\n",
     "parallel: 0 runs nothing"),
    ("escape", "parallel: 1\nsteps:\n  a:\n    commands: [{name: x, type: shell, file: /etc/passwd}]\n",
     "is an absolute path"),
])
def test_job_file(scratch_jobs, unchanged, job, body, needle):
    (scratch_jobs / f"{job}.yml").write_text(body)
    result = bouwsteen("run", "tab_job", "--cluster", "lab", "--param", f"job={job}", "--param", "source=scratch")
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert f"{job}.yml" in text and needle in text, text


@pytest.mark.parametrize("params, needle", [
    (["source={tmp}"], "is not a job source of cluster lab"),
    (["source=https://example.invalid/jobs.git"], "is not a job source of cluster lab"),
    (["source=--upload-pack=touch /tmp/pwned"], "is not a job source of cluster lab"),
    (["revision=main"], "revision: source shipped is a directory"),
    (["job=../../etc/passwd"], "is not a job name"),
])
def test_job_source_parameters(registered, unchanged, tmp_path, params, needle):
    (tmp_path / "purge_audit_log.yml").write_text("parallel: 1\nsteps: {a: {commands: [{type: shell, inline: 'true'}]}}\n")
    args = [a for p in params for a in ("--param", p.format(tmp=tmp_path))]
    result = bouwsteen("run", "tab_job", "--cluster", "lab", *args)
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("backup, needle", [
    ("20261127-010000X", "is not a pgBackRest backup label"),
    ("../../etc/passwd", "is not a pgBackRest backup label"),
    ("20200101-000000F", "is not among the good backups"),
])
def test_backup_names(backed_up, unchanged, backup, needle):
    result = bouwsteen("run", "restore_drill", "--cluster", "lab", "--param", f"backup={backup}")
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("target, needle", [
    ("2999-01-01T00:00:00Z", "in the future"),
    ("last tuesday", "neither 'latest' nor an ISO-8601 time"),
    ("2026-11-27T10:00:00", "no time zone"),
])
def test_pitr_targets(backed_up, unchanged, target, needle):
    result = bouwsteen("run", "restore_drill", "--cluster", "lab", "--param", f"target={target}")
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("cron", ["61 1 * * *", "0 1 * *", "every night"])
def test_cron_expressions(cron):
    from deployments.deploy import validate_cron

    with pytest.raises(ValueError, match="cron"):
        validate_cron(cron)
