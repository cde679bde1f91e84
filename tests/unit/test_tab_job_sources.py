"""tab_job's job sources (issue 14 item 3): a run picks a source *name* from the cluster's
configuration, one of its allowed revisions and a job name; `file:` scripts stay in the job's
folder; a git source is cloned into a temporary folder that is always removed."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import flows.tab_job as tab_flow
from blocks.inventory import (
    SHIPPED_JOBS_DIRECTORY,
    InventoryError,
    JobSourceSpec,
    JobsSpec,
    parse_inventory,
)
from tasks import tab
from tasks.errors import PreflightRefused
from tasks.pgquartz import (
    JobFileError,
    JobSource,
    JobSourceError,
    check_job_name,
    choose_source,
    clone_command,
    job_file,
    load_job,
    read_script,
)
from tasks.planning.job_role import JobRole

# --------------------------------------------------------------------------- the configuration


def inventory(jobs: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": "lab", "network": "10.0.0.0/24"}
    if jobs is not None:
        cluster["jobs"] = jobs
    return {"cluster": cluster,
            "hosts": [{"name": f"pg{i}", "address": f"10.0.0.1{i}", "roles": ["db"]} for i in (1, 2, 3)]}


SITE = {"git": "https://git.example.com/dba/jobs.git", "revisions": ["main", "v1.2"]}
LOCAL = {"directory": "/srv/bouwsteen/jobs"}


def test_the_default_configuration_offers_the_shipped_jobs_only() -> None:
    jobs = parse_inventory(inventory()).cluster.jobs
    assert jobs.source_names == ["shipped"] and jobs.member_of is None
    assert jobs.source("shipped").directory == str(SHIPPED_JOBS_DIRECTORY)
    assert (SHIPPED_JOBS_DIRECTORY / "purge_audit_log.yml").is_file()
    assert jobs.source("anything") is None


def test_declared_sources_load_and_survive_a_dump() -> None:
    inv = parse_inventory(inventory({"sources": {"site": SITE, "local": LOCAL}, "member_of": ["app", "pg_maintain"]}))
    assert inv.cluster.jobs.source_names == ["shipped", "site", "local"]
    assert parse_inventory(inv.model_dump(mode="json")) == inv  # the block round-trips (with_db_host does this)
    assert "shipped" not in inv.model_dump(mode="json")["cluster"]["jobs"]["sources"]  # never pinned in a block


def _source(name: str = "site", **spec: Any) -> dict[str, Any]:
    return {"sources": {name: spec}}


@pytest.mark.parametrize("jobs, field, reason", [
    (_source(git="http://git.example.com/jobs.git", revisions=["main"]), "cluster.jobs.sources.site.git",
     "scheme 'http' is not allowed"),
    (_source(git="git@git.example.com:dba/jobs.git", revisions=["main"]), "cluster.jobs.sources.site.git",
     "String should match pattern"),
    (_source(git="--upload-pack=touch /tmp/x", revisions=["main"]), "cluster.jobs.sources.site.git",
     "String should match pattern"),
    (_source(git="ext::sh -c touch% /tmp/x", revisions=["main"]), "cluster.jobs.sources.site.git",
     "String should match pattern"),
    (_source(git="ssh://-oProxyCommand=touch/x", revisions=["main"]), "cluster.jobs.sources.site.git",
     "is not a host name or address"),
    (_source(git="https://dba:hunter2@git.example.com/jobs.git", revisions=["main"]), "cluster.jobs.sources.site.git",
     "credentials do not belong in the URL"),
    (_source(git="https://git.example.com/jobs%0a.git", revisions=["main"]), "cluster.jobs.sources.site.git",
     "percent-encoded control character"),
    (_source(git="https://git.example.com/jobs.git\n", revisions=["main"]), "cluster.jobs.sources.site.git",
     "String should match pattern"),
    (_source(git="file://otherhost/srv/jobs.git", revisions=["main"]), "cluster.jobs.sources.site.git",
     "absolute path on the worker"),
    (_source(git="https://git.example.com", revisions=["main"]), "cluster.jobs.sources.site.git",
     "names no repository path"),
    (_source(git="https://git.example.com/jobs.git"), "cluster.jobs.sources.site",
     "revisions: a git source lists the branches or tags"),
    (_source(git="https://git.example.com/jobs.git", revisions=["--upload-pack=x"]),
     "cluster.jobs.sources.site.revisions[0]", "String should match pattern"),
    (_source(git="https://git.example.com/jobs.git", revisions=["a..b"]),
     "cluster.jobs.sources.site.revisions[0]", "not a branch or tag name"),
    (_source(git="https://git.example.com/jobs.git", revisions=["main", "main"]), "cluster.jobs.sources.site",
     "revisions: a revision is listed twice"),
    (_source(directory="/srv/jobs", revisions=["main"]), "cluster.jobs.sources.site",
     "revisions: only a git source"),
    (_source(directory="../srv/jobs"), "cluster.jobs.sources.site.directory", "String should match pattern"),
    (_source(directory="/srv/../etc"), "cluster.jobs.sources.site.directory", "'..' component"),
    (_source(directory="/srv/jobs", git="https://git.example.com/jobs.git"), "cluster.jobs.sources.site",
     "exactly one of directory or git"),
    (_source(), "cluster.jobs.sources.site", "exactly one of directory or git"),
    (_source("Site", **LOCAL), "cluster.jobs.sources.Site.[key]", "String should match pattern"),
    (_source("-x", **LOCAL), "cluster.jobs.sources.-x.[key]", "String should match pattern"),
    (_source("shipped", **LOCAL), "cluster.jobs.sources", "'shipped' is the name of the jobs this repository ships"),
    (_source(directory="/srv/jobs", branch="main"), "cluster.jobs.sources.site.branch", "Extra inputs"),
    ({"member_of": ["App"]}, "cluster.jobs.member_of[0]", "String should match pattern"),
    ({"member_of": ["app", "app"]}, "cluster.jobs.member_of", "listed twice"),
])
def test_bad_job_sources_name_file_field_and_reason(jobs: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InventoryError) as err:
        parse_inventory(inventory(jobs), "site-a.yml")
    text = str(err.value)
    assert f"site-a.yml: {field}: " in text, text
    assert reason in text, text


@pytest.mark.parametrize("url", [
    "https://git.example.com/dba/jobs.git", "https://git.example.com:8443/dba/jobs.git",
    "ssh://git@git.example.com/dba/jobs.git", "ssh://git@git.example.com:2222/dba/jobs.git",
    "ssh://[2001:db8::1]/dba/jobs.git", "file:///srv/git/jobs.git",
])
def test_good_git_urls(url: str) -> None:
    assert JobSourceSpec(git=url, revisions=["main"]).git == url


# --------------------------------------------------------------------------- what a run may pick

JOBS = JobsSpec.model_validate({"sources": {"site": SITE, "local": LOCAL}})


@pytest.mark.parametrize("name, revision, chosen", [
    ("shipped", "", JobSource("shipped", directory=SHIPPED_JOBS_DIRECTORY)),
    ("local", "", JobSource("local", directory=Path("/srv/bouwsteen/jobs"))),
    ("site", "", JobSource("site", git=SITE["git"], revision="main")),  # the first allowed revision
    ("site", "v1.2", JobSource("site", git=SITE["git"], revision="v1.2")),
])
def test_a_run_picks_a_named_source(name: str, revision: str, chosen: JobSource) -> None:
    assert choose_source(JOBS, "lab", name, revision) == chosen


@pytest.mark.parametrize("name, revision, reason", [
    ("nope", "", "source: 'nope' is not a job source of cluster lab; its sources (cluster.jobs.sources): "
                 "shipped, site, local"),
    ("/etc", "", "source: '/etc' is not a job source of cluster lab (a source is a name from the cluster's "
                 "configuration, never a path or URL)"),
    (str(SHIPPED_JOBS_DIRECTORY), "", "never a path or URL"),
    ("https://evil.example/jobs.git", "", "never a path or URL"),
    ("--upload-pack=touch /tmp/pwned", "", "never a path or URL"),
    ("site", "dev", "revision: 'dev' is not an allowed revision of source site "
                    "(cluster.jobs.sources.site.revisions: main, v1.2)"),
    ("site", "--upload-pack=x", "revision: '--upload-pack=x' is not an allowed revision"),
    ("local", "main", "revision: source local is a directory, which has no revisions"),
    ("shipped", "main", "revision: source shipped is a directory"),
])
def test_anything_else_is_refused_naming_the_parameter(name: str, revision: str, reason: str) -> None:
    with pytest.raises(JobSourceError) as err:
        choose_source(JOBS, "lab", name, revision)
    assert reason in str(err.value)


def test_a_site_may_drop_the_shipped_jobs() -> None:
    jobs = JobsSpec.model_validate({"sources": {"local": LOCAL}, "shipped": False})
    with pytest.raises(JobSourceError, match="its sources \\(cluster.jobs.sources\\): local$"):
        choose_source(jobs, "lab", "shipped")


@pytest.mark.parametrize("name, ok", [
    ("purge_audit_log", True), ("x1", True), ("_", True),
    ("../x", False), ("../../etc/passwd", False), ("A", False), ("x-y", False), ("x.yml", False), ("x/y", False),
    ("", False), (" x", False), ("x\n", False), ("-x", False),
])
def test_job_names(name: str, ok: bool) -> None:
    if ok:
        assert check_job_name(name) == name
    else:
        with pytest.raises(JobSourceError, match=r"^job: .* is not a job name \(it must match \^\[a-z0-9_\]\+\$"):
            check_job_name(name)


JOB = {"parallel": 1, "steps": {"s": {"commands": [{"type": "shell", "inline": "true"}]}}}


def test_a_job_file_must_live_in_its_source(tmp_path: Path) -> None:
    source, outside = tmp_path / "jobs", tmp_path / "elsewhere"
    source.mkdir()
    outside.mkdir()
    (outside / "x.yml").write_text(yaml.safe_dump(JOB))
    (source / "inside.yml").write_text(yaml.safe_dump(JOB))
    (source / "alias.yml").symlink_to(source / "inside.yml")
    (source / "escape.yml").symlink_to(outside / "x.yml")
    assert job_file(source, "inside") == source / "inside.yml"
    assert job_file(source, "alias") == source / "alias.yml"
    with pytest.raises(JobSourceError, match=r"^job: escape.yml in .* leads outside that folder"):
        job_file(source, "escape")
    with pytest.raises(JobSourceError, match=r"^job: no job file missing.yml in .*found: alias, escape, inside"):
        job_file(source, "missing")
    with pytest.raises(JobSourceError, match="is not a job name"):
        job_file(source, "../elsewhere/x")


# --------------------------------------------------------------------------- file: stays in the job's folder


def file_job(tmp_path: Path, file: str, *, where: str = "step", workdir: str = "") -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir(exist_ok=True)
    data: dict[str, Any] = copy.deepcopy(JOB)
    command = {"name": "script", "type": "shell", "file": file}
    if where == "step":
        data["steps"]["s"]["commands"] = [command]
    else:
        data["checks"] = [command]
    if workdir:
        data["workdir"] = workdir
    path = folder / "job.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def _script(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("echo hi\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("file, setup, where, workdir, reason", [
    ("/etc/passwd", None, "step", "", "is an absolute path"),
    ("/etc/passwd", None, "check", "", "is an absolute path"),
    ("../secret.sh", lambda t: _script(t / "secret.sh"), "step", "", "leads outside the job file's folder"),
    ("sub/../../secret.sh", lambda t: _script(t / "secret.sh"), "step", "", "leads outside the job file's folder"),
    ("link.sh", lambda t: (t / "jobs" / "link.sh").symlink_to(_script(t / "secret.sh")), "step", "",
     "leads outside the job file's folder"),
    ("passwd", None, "step", "/etc", "leads outside the job file's folder"),
    ("secret.sh", lambda t: _script(t / "secret.sh"), "check", "..", "leads outside the job file's folder"),
])
def test_file_scripts_may_not_leave_the_jobs_folder(tmp_path: Path, file: str, setup: Callable | None, where: str,
                                                     workdir: str, reason: str) -> None:
    (tmp_path / "jobs").mkdir()
    if setup:
        setup(tmp_path)
    with pytest.raises(JobFileError) as err:
        load_job(file_job(tmp_path, file, where=where, workdir=workdir))
    (problem,) = err.value.problems
    key = "steps.s.commands[0].file" if where == "step" else "checks[0].file"
    assert problem.key == key and reason in problem.reason


@pytest.mark.parametrize("file, workdir", [("run.sh", ""), ("sub/run.sh", ""), ("sub/../run.sh", ""),
                                           ("run.sh", "sub/.."), ("inner.sh", "sub")])
def test_file_scripts_inside_the_folder_load(tmp_path: Path, file: str, workdir: str) -> None:
    for name in ("run.sh", "sub/run.sh", "sub/inner.sh"):
        _script(tmp_path / "jobs" / name)
    job = load_job(file_job(tmp_path, file, workdir=workdir))
    assert read_script(job, job.steps["s"].commands[0]) == "echo hi\n"


def test_a_script_swapped_for_a_symlink_after_loading_is_not_read(tmp_path: Path) -> None:
    script = _script(tmp_path / "jobs" / "run.sh")
    job = load_job(file_job(tmp_path, "run.sh"))
    script.unlink()
    script.symlink_to(_script(tmp_path / "secret.sh"))
    with pytest.raises(JobFileError, match="leads outside the job file's folder"):
        read_script(job, job.steps["s"].commands[0])


# --------------------------------------------------------------------------- git: options and clean-up


def test_the_clone_command_ends_options_before_url_and_folder() -> None:
    argv = clone_command(JobSource("site", git="https://git.example.com/jobs.git", revision="v1.2"), Path("/t/x"))
    assert argv[:2] == ["git", "clone"] and argv[-3:] == ["--", "https://git.example.com/jobs.git", "/t/x"]
    assert argv[argv.index("--branch") + 1] == "v1.2" and "--depth" in argv


@pytest.mark.parametrize("source, field", [
    (JobSource("x", git="--upload-pack=touch /tmp/pwned", revision="main"), "source"),
    (JobSource("x", git="-u", revision="main"), "source"),
    (JobSource("x", git="https://git.example.com/jobs.git", revision="--config=core.x=y"), "revision"),
    (JobSource("x", git="https://git.example.com/jobs.git", revision=""), "revision"),
])
def test_option_like_values_are_refused_even_when_built_by_hand(source: JobSource, field: str) -> None:
    with pytest.raises(JobSourceError, match=f"^{field}: .* looks like an option; refused"):
        clone_command(source, Path("/t/x"))


def _git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd)}
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=env)


@pytest.fixture
def jobs_repo(tmp_path: Path) -> str:
    """A local bare repository of jobs: branch main and tag v1 (file:// URL)."""
    work = tmp_path / "work"
    work.mkdir()
    _git("init", "--quiet", "--initial-branch=main", cwd=work)
    (work / "probe.yml").write_text(yaml.safe_dump(JOB))
    _git("add", "probe.yml", cwd=work)
    _git("commit", "--quiet", "-m", "probe", cwd=work)
    _git("tag", "v1", cwd=work)
    _git("clone", "--quiet", "--bare", str(work), str(tmp_path / "jobs.git"), cwd=tmp_path)
    return f"file://{tmp_path / 'jobs.git'}"


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.mark.parametrize("revision", ["main", "v1"])
def test_a_clone_is_removed_after_the_run(jobs_repo: str, temp_root: Path, revision: str) -> None:
    with tab.checked_out(JobSource("site", git=jobs_repo, revision=revision)) as directory:
        assert directory.is_relative_to(temp_root)
        assert load_job(job_file(directory, "probe")).name == "probe"
    assert list(temp_root.iterdir()) == []


def test_a_clone_is_removed_when_the_run_fails(jobs_repo: str, temp_root: Path) -> None:
    with (pytest.raises(RuntimeError, match="step failed"),
          tab.checked_out(JobSource("site", git=jobs_repo, revision="main")) as directory):
        assert (directory / "probe.yml").is_file()
        raise RuntimeError("step failed")
    assert list(temp_root.iterdir()) == []


def test_a_failed_clone_leaves_nothing_behind(jobs_repo: str, temp_root: Path) -> None:
    with (pytest.raises(JobSourceError, match=r"^source: git clone of source site .* at nope\) failed"),
          tab.checked_out(JobSource("site", git=jobs_repo, revision="nope"))):
        pytest.fail("no folder for a revision that does not exist")
    assert list(temp_root.iterdir()) == []


def test_a_directory_source_is_used_as_it_is(tmp_path: Path, temp_root: Path) -> None:
    with tab.checked_out(JobSource("local", directory=tmp_path)) as directory:
        assert directory == tmp_path
    assert tmp_path.is_dir() and list(temp_root.iterdir()) == []
    with (pytest.raises(JobSourceError, match="is not a directory on this worker"),
          tab.checked_out(JobSource("local", directory=tmp_path / "missing"))):
        pass


# --------------------------------------------------------------------------- the flow refuses before anything runs


@pytest.fixture
def flow_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """tab_job's pre-flight against a configuration with a `local` source in tmp_path; anything
    past the refusals (nodes, the job role's snapshot, a clone) fails the test."""
    local = tmp_path / "local"
    local.mkdir()
    jobs = JobsSpec.model_validate({"sources": {"local": {"directory": str(local)}, "site": SITE}})
    ctx = SimpleNamespace(name="lab", inventory=SimpleNamespace(cluster=SimpleNamespace(jobs=jobs)))
    cloned: list[JobSource] = []

    def no_clone(source: JobSource) -> Any:
        cloned.append(source)
        raise AssertionError("nothing may be cloned")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pre-flight went past its refusals")

    monkeypatch.setattr(tab_flow, "get_run_logger", lambda: logging.getLogger("tests.tab_job"))
    monkeypatch.setattr(tab_flow, "context_for", lambda cluster, fresh=False: ctx)
    monkeypatch.setattr(tab_flow, "job_role_of", lambda ctx: JobRole("bouwsteen_job", "pw", ("app",)))
    monkeypatch.setattr(tab_flow, "checked_out", no_clone)
    monkeypatch.setattr(tab_flow, "target_nodes", never)
    monkeypatch.setattr(tab_flow, "is_job_role_safe", never)
    return SimpleNamespace(local=local, cloned=cloned, monkeypatch=monkeypatch)


@pytest.mark.parametrize("params, reason", [
    ({"source": "/etc"}, "source: '/etc' is not a job source of cluster lab"),
    ({"source": str(SHIPPED_JOBS_DIRECTORY)}, "is not a job source of cluster lab"),
    ({"source": "https://evil.example/jobs.git"}, "is not a job source of cluster lab"),
    ({"source": "--upload-pack=touch /tmp/pwned"}, "is not a job source of cluster lab"),
    ({"source": "site", "revision": "evil"}, "revision: 'evil' is not an allowed revision of source site"),
    ({"source": "local", "revision": "main"}, "revision: source local is a directory"),
    ({"job": "../../etc/passwd"}, "job: '../../etc/passwd' is not a job name"),
    ({"job": "Purge"}, "job: 'Purge' is not a job name"),
])
def test_the_flow_refuses_parameters_before_anything_runs(flow_env: SimpleNamespace, params: dict[str, str],
                                                          reason: str) -> None:
    with pytest.raises(PreflightRefused) as err:
        tab_flow.tab_job.fn(cluster="lab", **params)
    assert str(err.value).startswith("refused, nothing ran: ") and reason in str(err.value)
    assert flow_env.cloned == []


def test_the_flow_refuses_a_job_that_would_act_as_the_superuser(flow_env: SimpleNamespace) -> None:
    flow_env.monkeypatch.setattr(tab_flow, "checked_out", tab.checked_out)
    data = {"parallel": 1, "connections": {"pg": {"role": "primary", "conn_params": {"dbname": "app",
                                                                                     "user": "postgres"}}},
            "steps": {"s": {"commands": [{"type": "pg", "inline": "select 1"}]}}}
    (flow_env.local / "as_postgres.yml").write_text(yaml.safe_dump(data))
    with pytest.raises(PreflightRefused) as err:
        tab_flow.tab_job.fn(cluster="lab", job="as_postgres", source="local")
    assert "connections.pg.conn_params.user: 'postgres' is not a role jobs may act as; SQL steps log in as " \
           "bouwsteen_job and may act as bouwsteen_job, app (cluster.jobs.member_of)" in str(err.value)
