"""Load PgQuartz job files unchanged and validate them more strictly than PgQuartz does.

PgQuartz verifies little and late: after it has taken the etcd lock, and some mistakes (a typo'd
key, `parallel: 0`, a `when` on a step that is not a dependency) never produce an error at all.
Here every problem is found at load time and reported together, each naming the file, the key
path (`steps.report.depends[0]`) and the reason.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import ValidationError

from tasks.errors import BouwsteenError

from .model import ALL_KEYS, SHELL, Check, Command, Job
from .plan import find_cycle, split_batch, sql_text_args
from .when import WhenExpressionError, when_step_refs

__all__ = ["JobFileError", "Problem", "load_job", "load_jobs", "parse_job", "script_path", "script_escape",
           "read_script", "executable_by_me", "JOB_SUFFIXES"]

JOB_SUFFIXES = (".yml", ".yaml")
ROOT_KEY = "<root>"


@dataclass(frozen=True)
class Problem:
    file: str
    key: str  # e.g. "steps.report.depends[0]"; ROOT_KEY for the document itself
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class JobFileError(BouwsteenError, ValueError):
    """One or more problems in job files; `str()` lists them one per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("JobFileError needs at least one problem")
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def file(self) -> str:
        return self.problems[0].file

    @property
    def key(self) -> str:
        return self.problems[0].key

    @property
    def reason(self) -> str:
        return self.problems[0].reason


# --------------------------------------------------------------------------- YAML as yaml.v2 reads it


class _GoYamlLoader(yaml.SafeLoader):
    """SafeLoader that keeps scalars as their text and refuses duplicate keys.

    yaml.v2 decodes into typed Go fields, so `port: 5432` or a matrix value `010` arrives in a
    string field as the text "5432" / "010"; PyYAML would make them ints (and `2024-01-01` a
    date, `yes` True). Only null and merge (`<<`) keep their YAML meaning; the models convert
    ints, bools and durations like yaml.v2 does.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                # PyYAML keeps the last value silently; make the author pick one.
                raise _DuplicateKey(key_node.value, line, seen[key_node.value])
            seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


_GoYamlLoader.yaml_implicit_resolvers = {
    first: kept
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    if (kept := [(tag, rx) for tag, rx in resolvers
                 if tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")])
}


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first_line: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


# --------------------------------------------------------------------------- key paths and reasons


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out or ROOT_KEY


def _squash(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


_WRONG_DOC_KEYS = {
    "general_config": "the PgVillage docs' name; pgquartz has no such section: put its keys (parallel, "
                      "timeout, ...) at the top level",
}


def _unknown_key_reason(key: str) -> str:
    reason = f"unknown key {key!r}"
    if key in _WRONG_DOC_KEYS:
        return f"{reason} ({_WRONG_DOC_KEYS[key]})"
    squashed = {_squash(k): k for k in ALL_KEYS}
    guess = squashed.get(_squash(key)) or next(iter(difflib.get_close_matches(key, sorted(ALL_KEYS), n=1)), None)
    if guess:
        reason += f" (did you mean {guess!r}?)"
    return reason + "; pgquartz would silently ignore it"


def _missing_reason(loc: tuple[Any, ...]) -> str:
    if loc == ("parallel",):
        return "missing: pgquartz's default, parallel: 0, runs nothing in pgquartz; set parallel ≥ 1"
    if loc == ("steps",):
        return "missing: at least one step is required"
    if loc and loc[-1] == "role":
        return "missing: set role to primary, standby or all (pgquartz fails on an empty role)"
    return "required key is missing"


def _pydantic_problems(file: str, err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            reason = _unknown_key_reason(str(loc[-1]))
        elif e["type"] == "missing":
            reason = _missing_reason(loc)
        elif e["type"] == "value_error":
            reason = str(e["ctx"]["error"])
        else:
            reason = f"{e['msg']}, got {e['input']!r}" if "input" in e else e["msg"]
        problems.append(Problem(file, _key_path(loc), reason))
    return problems


# --------------------------------------------------------------------------- loading


def _job_name(path: Path) -> str:
    return path.stem  # pgquartz: basename minus the last extension


def parse_job(data: Any, *, source: Path | str, name: str | None = None, file: str | None = None) -> Job:
    """Validate already-parsed job data as if it was read from `source` (the job file path).

    `source` anchors `workdir` and `file:` paths; `name` defaults to its stem.
    """
    source = Path(source)
    file = file or str(source)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise JobFileError([Problem(file, ROOT_KEY, f"a job file must be a YAML mapping, got {got}")])
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(_pydantic_problems(file, exc)) from None
    job.bind_source(source, name or _job_name(source))
    problems = _check_job(job, file)
    if problems:
        raise JobFileError(problems)
    return job


def load_job(path: str | Path) -> Job:
    """Read and validate one job file. Raises JobFileError."""
    given = str(path)
    # pgquartz resolves symlinks first: the job name and default workdir are the target's.
    resolved = Path(path).resolve()
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError([Problem(given, ROOT_KEY, f"cannot read job file: {exc}")]) from None
    try:
        data = yaml.load(text, Loader=_GoYamlLoader)  # noqa: S506 - SafeLoader subclass
    except _DuplicateKey as exc:
        raise JobFileError([Problem(given, exc.key, f"duplicate key at line {exc.line} "
                                                    f"(first at line {exc.first_line})")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobFileError([Problem(given, ROOT_KEY, f"invalid YAML{where}: {problem}")]) from None
    return parse_job(data, source=resolved, file=given)


def load_jobs(directory: str | Path) -> dict[str, Job]:
    """All `*.yml` / `*.yaml` job files in `directory` (not recursive), by job name.

    Every file is checked; problems of all files are raised together in one JobFileError.
    """
    root = Path(directory)
    if not root.is_dir():
        raise JobFileError([Problem(str(root), ROOT_KEY, "not a directory")])
    jobs: dict[str, Job] = {}
    origin: dict[str, Path] = {}
    problems: list[Problem] = []
    for path in sorted(p for p in root.iterdir() if p.suffix in JOB_SUFFIXES and not p.name.startswith(".")):
        try:
            job = load_job(path)
        except JobFileError as exc:
            problems.extend(exc.problems)
            continue
        # Two files with one name (x.yml and x.yaml, or two symlinks to one file) would share a
        # lock key and a log file name without anyone intending it.
        if job.name in origin:
            problems.append(Problem(str(path), ROOT_KEY,
                                    f"job name {job.name!r} is already used by {origin[job.name].name}"))
            continue
        origin[job.name] = path
        jobs[job.name] = job
    if problems:
        raise JobFileError(problems)
    return jobs


def script_path(job: Job, command: Command) -> Path | None:
    """Absolute path of a `file:` command (relative to the workdir), None for inline commands."""
    if not command.file:
        return None
    path = Path(command.file)
    return path if path.is_absolute() else job.workdir_path / path


def script_escape(job: Job, command: Command) -> str | None:
    """Why a `file:` script may not be read, or None: it must be a relative path that stays, with
    symlinks resolved, inside the folder of the job file (which the run's job source holds), so
    a job can never read the controller's files. pgquartz itself would read any path."""
    if not command.file:
        return None
    if Path(command.file).is_absolute():
        return f"script {command.file!r} is an absolute path; give it relative to the job file's folder"
    folder = job.source.parent if job.source is not None else Path.cwd()
    path = script_path(job, command)
    assert path is not None
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        return (f"script {command.file!r} leads outside the job file's folder {folder} (to {resolved}); "
                "a job reads only files that live beside it")
    return None


def read_script(job: Job, command: Command) -> str:
    """The command body: `inline`, or the contents of `file` (never from outside the job's folder)."""
    path = script_path(job, command)
    if path is None:
        return command.inline
    escape = script_escape(job, command)
    if escape:
        raise JobFileError([Problem(str(job.source), command.label, escape)])
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- checks beyond pgquartz


def _check_command(job: Job, cmd: Command, key: str, matrix: dict[str, list[str]], file: str) -> list[Problem]:
    problems = []
    if cmd.type == "" and job.connections:
        # pgquartz's verifier reads an empty type as "the only connection" (SQL) but its runner
        # runs it as shell; with connections around, the author's intent is unclear.
        problems.append(Problem(file, f"{key}.type",
                                f"type is empty; say type: {SHELL} or name a connection "
                                f"({', '.join(job.connections)}) - pgquartz would run it as shell"))
    elif not cmd.is_shell and cmd.type not in job.connections:
        known = ", ".join(job.connections) or "none defined"
        problems.append(Problem(file, f"{key}.type",
                                f"unknown connection {cmd.type!r}; use {SHELL} or a connection name ({known})"))
    body = cmd.inline
    path = script_path(job, cmd)
    escape = script_escape(job, cmd)
    if escape:
        problems.append(Problem(file, f"{key}.file", escape))
        return problems
    if path is not None:
        if not path.is_file():
            problems.append(Problem(file, f"{key}.file", f"script {cmd.file!r} not found (looked for {path})"))
            return problems
        try:
            body = path.read_text(encoding="utf-8")
            status = path.stat()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(file, f"{key}.file", f"cannot read script {cmd.file!r}: {exc}"))
            return problems
        if cmd.type == SHELL and not executable_by_me(status):
            # pgquartz's verifier refuses it (panic, exit 2) although it would run it as `/bin/bash <file>`.
            problems.append(Problem(file, f"{key}.file",
                                    f"script {cmd.file!r} is not executable (mode {status.st_mode & 0o7777:04o}, "
                                    f"owner uid {status.st_uid}, gid {status.st_gid}; we are uid {os.getuid()}, "
                                    f"gid {os.getgid()}): pgquartz refuses a type: {SHELL} script it may not "
                                    f"execute; chmod +x {path}"))
    body_key = f"{key}.{'file' if path is not None else 'inline'}"
    if cmd.is_shell:
        if cmd.role:
            problems.append(Problem(file, f"{key}.role", "role applies to SQL commands only; "
                                                         "pgquartz ignores it for shell"))
        return problems
    unknown = sorted(sql_text_args(body) - set(matrix))
    if unknown:
        problems.append(Problem(file, body_key, f"uses ${{{unknown[0]}}} but there is no matrix argument "
                                                f"{unknown[0]!r}; it would reach the server as literal text"))
    if not cmd.batch_mode and len(split_batch(body)) > 1:
        problems.append(Problem(file, body_key, f"{len(split_batch(body))} SQL statements without batchMode: "
                                                "pgquartz sends one query per statement and this one would fail; "
                                                "set batchMode: true or use one command per statement"))
    return problems


def executable_by_me(status: os.stat_result) -> bool:
    """pgquartz's test for a `type: shell` script: executable by others, by its owner when that is
    us, or by its group when that is our (primary) group. Like pgquartz, root gets no exception."""
    mode = status.st_mode
    return bool(mode & 0o001
                or (mode & 0o100 and status.st_uid == os.getuid())
                or (mode & 0o010 and status.st_gid == os.getgid()))


def _check_job(job: Job, file: str) -> list[Problem]:
    problems: list[Problem] = []
    log_file = job.log_file_path
    if log_file is not None and not log_file.exists():
        # pgquartz stats logFile while reading its config and stops there (exit 1), before the lock.
        problems.append(Problem(file, "logFile", f"{job.log_file!r} does not exist (looked for {log_file}): "
                                                 "pgquartz refuses to start; create the file or directory "
                                                 "(a directory gets <dir>/<YYYY-MM-DD>_<job>.log) or drop logFile"))
    if SHELL in job.connections:
        problems.append(Problem(file, f"connections.{SHELL}", f"a connection may not be named {SHELL!r}: "
                                                              f"type: {SHELL} always means a shell command"))
    for step_name, step in job.steps.items():
        base = _key_path(("steps", step_name))
        for i, dep in enumerate(step.depends):
            if dep not in job.steps:
                problems.append(Problem(file, f"{base}.depends[{i}]",
                                        f"unknown step {dep!r} (steps: {', '.join(job.steps)})"))
        for i, cmd in enumerate(step.commands):
            problems += _check_command(job, cmd, f"{base}.commands[{i}]", step.matrix, file)
        for i, rule in enumerate(step.when):
            problems += _check_when(job, step_name, rule, f"{base}.when[{i}]", file)
    cycle = find_cycle({name: step.depends for name, step in job.steps.items()})
    if cycle:
        problems.append(Problem(file, f"{_key_path(('steps', cycle[0]))}.depends",
                                f"dependency cycle: {' → '.join(cycle)}"))
    for i, check in enumerate(job.checks):
        problems += _check_command(job, check, f"checks[{i}]", check.matrix, file)
        problems += _check_check(check, f"checks[{i}]", file)
    return problems


def _check_when(job: Job, step_name: str, rule: str, key: str, file: str) -> list[Problem]:
    try:
        refs = when_step_refs(rule)
    except WhenExpressionError as exc:
        return [Problem(file, key, f"invalid when rule {rule!r}: {exc}")]
    problems = []
    depends = set(job.steps[step_name].depends)
    for ref in sorted(refs):
        if ref not in job.steps:
            problems.append(Problem(file, key, f"when rule uses unknown step {ref!r}"))
        elif ref not in depends:
            problems.append(Problem(file, key, f"when rule uses step {ref!r}, which is not in depends: pgquartz "
                                               f"would evaluate it before {ref!r} ran (pgquartz issue #42); "
                                               f"add {ref!r} to depends"))
    return problems


def _check_check(check: Check, key: str, file: str) -> list[Problem]:
    if check.is_shell and not 0 <= check.rc <= 255:
        return [Problem(file, f"{key}.rc", f"a shell exit code is 0..255, got {check.rc}")]
    return []
