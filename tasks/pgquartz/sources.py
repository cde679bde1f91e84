"""Where a run's job file comes from: one of the sources the cluster's configuration names.

A flow parameter (the REST API included) only ever picks a *name*: the source (`cluster.jobs.
sources` in the inventory block, plus `shipped`), one of that source's allowed revisions, and a
job name. Everything a clone or a path is built from comes from the validated inventory.

Pure: no Prefect, no git; `tasks.tab.checked_out` runs `clone_command` and removes the clone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from blocks.inventory import JOB_NAME, JobsSpec
from tasks.errors import BouwsteenError

from .loader import JOB_SUFFIXES

__all__ = ["JobSourceError", "JobSource", "choose_source", "check_job_name", "job_file", "clone_command",
           "GIT_ALLOWED_PROTOCOLS"]

_JOB_NAME = re.compile(JOB_NAME)
# git's own allow-list (GIT_ALLOW_PROTOCOL) for the clone and anything it might follow.
GIT_ALLOWED_PROTOCOLS = "https:ssh:file"


class JobSourceError(BouwsteenError, ValueError):
    """A job source, revision or job name a run may not use; the message starts with the field."""


@dataclass(frozen=True)
class JobSource:
    """A chosen source: a directory as it is, or a git URL at one allowed revision."""

    name: str
    directory: Path | None = None
    git: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.git is not None:
            return f"source {self.name} ({self.git} at {self.revision})"
        return f"source {self.name} ({self.directory})"


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def choose_source(jobs: JobsSpec, cluster: str, name: str, revision: str = "") -> JobSource:
    """The source `name` of the cluster's configuration at `revision` ("" = its first allowed one;
    a directory has none). Raises JobSourceError naming the parameter: anything else, a path or
    URL given as the source included, is refused before anything runs."""
    spec = jobs.source(name)
    if spec is None:
        known = ", ".join(jobs.source_names) or "none"
        hint = " (a source is a name from the cluster's configuration, never a path or URL)" \
            if any(c in name for c in "/:\\.") or name.startswith("-") else ""
        raise JobSourceError(f"source: {_shown(name)} is not a job source of cluster {cluster}{hint}; "
                             f"its sources (cluster.jobs.sources): {known}")
    if spec.git is None:
        if revision:
            raise JobSourceError(f"revision: source {name} is a directory, which has no revisions; "
                                 f"leave revision empty (got {_shown(revision)})")
        return JobSource(name=name, directory=Path(spec.directory or ""))
    if not revision:
        revision = spec.revisions[0]
    elif revision not in spec.revisions:
        raise JobSourceError(f"revision: {_shown(revision)} is not an allowed revision of source {name} "
                             f"(cluster.jobs.sources.{name}.revisions: {', '.join(spec.revisions)})")
    return JobSource(name=name, git=spec.git, revision=revision)


def check_job_name(name: str) -> str:
    """A job is named as its file without .yml: lower-case letters, digits and `_` only."""
    if not _JOB_NAME.fullmatch(name):
        raise JobSourceError(f"job: {_shown(name)} is not a job name (it must match {JOB_NAME}: the job file's "
                             "name without .yml, in the source's folder)")
    return name


def job_file(directory: Path, name: str) -> Path:
    """The job file `<name>.yml` (or `.yaml`) directly in `directory`; a symlink must lead to a
    file inside that folder, since the job's folder bounds what its `file:` scripts may read."""
    check_job_name(name)
    root = directory.resolve()
    for suffix in JOB_SUFFIXES:
        candidate = directory / f"{name}{suffix}"
        if candidate.exists():
            if not candidate.resolve().is_relative_to(root):
                raise JobSourceError(f"job: {candidate.name} in {directory} leads outside that folder "
                                     f"(to {candidate.resolve()}); a job file must live in its source")
            return candidate
    known = sorted(p.stem for p in directory.glob("*.y*ml"))
    raise JobSourceError(f"job: no job file {name}.yml in {directory} (found: {', '.join(known) or 'none'})")


def clone_command(source: JobSource, target: Path) -> list[str]:
    """`git clone` of the source's one revision into `target`: shallow, and `--` before the URL
    and the folder so neither can ever be read as an option (the inventory refuses such values
    already; this holds even for a source built by hand)."""
    if source.git is None or source.revision is None:
        raise JobSourceError(f"source: {source.name} is not a git source")
    for field, value in (("source", source.git), ("revision", source.revision), ("target", str(target))):
        if value.startswith("-") or not value:
            raise JobSourceError(f"{field}: {_shown(value)} looks like an option; refused")
    return ["git", "clone", "--quiet", "--depth", "1", "--no-tags", "--branch", source.revision,
            "--", source.git, str(target)]
