"""Pure planning helpers for running a PgQuartz job: order, instances, SQL text, check verdicts.

Nothing here does I/O. The runner (a Prefect flow) decides where things run; these functions
decide *what* runs and reproduce PgQuartz's semantics where a job file depends on them:

* steps run in dependency waves (`step_waves`); every matrix combination is one instance
  (`expand_matrix`); a shell instance gets its matrix values as `PGQ_INSTANCE_<ARG>` (`instance_env`);
* SQL: `:arg` is a bind parameter and `${arg}` plain text (`render_sql`); with `batchMode` the text is
  split on `;` (`split_batch`) and each statement executed on the same connection. PgQuartz (pgx)
  runs every statement in its own implicit transaction, so use an autocommit psycopg connection,
  always pass the params dict (even when empty: psycopg then un-escapes `%%`) and expect one
  statement per execute, as pgx's extended protocol does;
* SQL output is rendered `{col}={value}` per row (`format_sql_rows`) because `when` rules and
  `expected`/`unexpected` strings are written against that exact text;
* every SQL command first checks its server's role (`ROLE_QUERY`, `role_problem`), on the
  connection it then runs on, as pgquartz's Connections.Execute does;
* an instance runs its commands in order until one fails; a failed command's output is dropped
  (`command_output`, `run_commands`), so `when` rules never see it;
* `when` rules (`evaluate_when`, `step_should_run`) and check verdicts (`check_passed`), the
  latter on pgquartz's quoted rendering of the output, stdout and stderr separately.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from tasks.errors import BouwsteenError
from tasks.planning.plan import Action, ActionPlan

from .model import Check, Command, Job, Step
from .when import (
    InstanceResult,
    StepResult,
    WhenExpressionError,
    evaluate_when,
    output_lines,
    render_result,
    result_lines,
    when_step_refs,
)

__all__ = [
    "PlanError", "step_waves", "find_cycle", "expand_matrix", "instance_env", "render_sql", "split_batch",
    "sql_text_args", "format_sql_rows", "effective_role", "check_passed", "step_should_run",
    "evaluate_when", "when_step_refs", "WhenExpressionError", "StepResult", "InstanceResult", "output_lines",
    "MATRIX_ENV_PREFIX", "job_action_plan", "run_waves", "ROLE_QUERY", "role_problem", "command_output",
    "run_commands", "Output",
]

MATRIX_ENV_PREFIX = "PGQ_INSTANCE_"


class PlanError(BouwsteenError, ValueError):
    """A job that cannot be ordered (unknown dependency or a cycle)."""


# --------------------------------------------------------------------------- step order


def find_cycle(depends: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as a path `[a, b, a]`, or None. Unknown names are ignored here."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in depends.get(name, ()):
            if dep not in depends:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in depends:  # declaration order, so the reported cycle is stable
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def step_waves(job: Job | Mapping[str, Step]) -> list[list[str]]:
    """Steps grouped in waves: each step lands in the first wave after all of its dependencies.

    Within a wave, steps keep their order in the job file, so the plan is deterministic (pgquartz
    itself walks a Go map, i.e. random order).
    """
    steps = job.steps if isinstance(job, Job) else job
    depends = {name: list(dict.fromkeys(step.depends)) for name, step in steps.items()}
    for name, deps in depends.items():
        for dep in deps:
            if dep not in depends:
                raise PlanError(f"step {name!r} depends on unknown step {dep!r}")
    cycle = find_cycle(depends)
    if cycle:
        raise PlanError(f"dependency cycle: {' → '.join(cycle)}")
    level: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in level:
            level[name] = 1 + max((depth(d) for d in depends[name]), default=-1)
        return level[name]

    waves: list[list[str]] = []
    for name in depends:
        d = depth(name)
        while len(waves) <= d:
            waves.append([])
        waves[d].append(name)
    return waves


def job_action_plan(job: Job, nodes: Sequence[str], lock_prefix: str) -> ActionPlan:
    """One action per wave, on every target node in turn; `when` rules are decided as the job runs."""
    where = ", ".join(nodes)
    waves = step_waves(job)
    actions = tuple(Action(where, f"wave {i}: " + ", ".join(
        f"{name}" + (f" ×{len(expand_matrix(job.steps[name].matrix))}" if job.steps[name].matrix else "")
        for name in wave)) for i, wave in enumerate(waves, 1))
    checks = (Action(where, f"then {len(job.checks)} check(s), after the lock is released"),) if job.checks else ()
    return ActionPlan(actions + checks, notes=(f"Steps run under pgquartz's etcd lock `{lock_prefix}`.",))


# One batch of a step's instances on one node -> one InstanceResult per instance (what the
# runner's step task returns; the outputs as lines, see `run_commands`).
RunBatch = Callable[[str, str, list], list[InstanceResult]]


def run_waves(job: Job, nodes: Sequence[str], run_batch: RunBatch,
              warn: Callable[[str], None] = lambda _: None) -> tuple[list[dict], dict[str, StepResult]]:
    """Run the job's steps as pgquartz does: per node, wave by wave; a step whose `when` rules are
    false (or error, which pgquartz also treats as false) is skipped; its matrix instances run in
    batches of `parallel`. Returns the report rows and each step's result for the `when` rules
    of later steps (a later node's results replace an earlier node's, as in pgquartz)."""
    rows: list[dict] = []
    results: dict[str, StepResult] = {}
    for node in nodes:
        for wave in step_waves(job):
            for step_name in wave:
                spec = job.steps[step_name]
                try:
                    run_it = step_should_run(spec, results)
                except WhenExpressionError as exc:
                    warn(f"{step_name}: when rule error ({exc}); skipped as pgquartz would.")
                    run_it = False
                if not run_it:
                    results[step_name] = StepResult()
                    rows.append({"node": node, "step": step_name, "instance": "", "rc": "skipped (when)"})
                    continue
                instances = expand_matrix(spec.matrix)
                done: list[InstanceResult] = []
                for i in range(0, len(instances), job.parallel):
                    done += run_batch(node, step_name, instances[i:i + job.parallel])
                results[step_name] = StepResult(done)
                rows += [{"node": node, "step": step_name, "instance": str(r.instance or ""), "rc": r.rc}
                         for r in done]
    return rows, results


def step_should_run(step: Step, step_results: Mapping[str, StepResult]) -> bool:
    """All `when` rules of `step` are true (no rules: run). Raises WhenExpressionError.

    PgQuartz treats an erroring rule as "skip the step"; a runner can do the same by catching.
    """
    return all(evaluate_when(rule, step_results) for rule in step.when)


# --------------------------------------------------------------------------- matrix


def expand_matrix(matrix: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """One dict per combination (cartesian product); empty matrix -> `[{}]` (one plain instance).

    Order is deterministic: arguments in file order, the first varying slowest. A repeated value
    collapses into one instance, as pgquartz keys instances by their values. An argument with no
    values yields no combinations (the loader rejects that).
    """
    names = list(matrix)
    values = [list(dict.fromkeys(str(v) for v in matrix[n])) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def instance_env(instance: Mapping[str, str]) -> dict[str, str]:
    """Environment variables for a shell instance: `{"PGQ_INSTANCE_TBL": "t1"}` for `tbl: t1`.

    PgQuartz passes *only* these when the step has a matrix (no PATH, HOME, ...) and the inherited
    environment when it has none; a runner that wants identical behaviour must do the same.
    """
    return {f"{MATRIX_ENV_PREFIX}{name.upper()}": str(value) for name, value in instance.items()}


# --------------------------------------------------------------------------- SQL text


def _is_ident_char(c: str) -> bool:
    return c == "_" or c == "$" or c.isalnum()


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")


def _sql_regions(sql: str) -> list[tuple[str, str]]:
    """Split SQL into ("code" | "literal" | "comment", text) regions, PostgreSQL lexing rules.

    Literals are '...' (E'...' with backslash escapes), "quoted identifiers" and $tag$...$tag$;
    comments are `-- ...` and nested `/* ... */`. An unterminated region runs to the end.
    """
    regions: list[tuple[str, str]] = []
    i, n, code_start = 0, len(sql), 0

    def emit(kind: str, start: int, end: int) -> None:
        nonlocal code_start
        if code_start < start:
            regions.append(("code", sql[code_start:start]))
        regions.append((kind, sql[start:end]))
        code_start = end

    while i < n:
        c = sql[i]
        if c == "'":
            backslash = i > 0 and sql[i - 1] in "eE" and (i < 2 or not _is_ident_char(sql[i - 2]))
            j = i + 1
            while j < n:
                if backslash and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            end = min(j + 1, n)
            emit("literal", i, end)
            i = end
        elif c == '"':
            j = i + 1
            while j < n:
                if sql[j] == '"':
                    if j + 1 < n and sql[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            end = min(j + 1, n)
            emit("literal", i, end)
            i = end
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            end = n if j < 0 else j
            emit("comment", i, end)
            i = end
        elif sql.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            emit("comment", i, j)
            i = j
        elif c == "$" and not (i > 0 and _is_ident_char(sql[i - 1])):
            m = _DOLLAR_TAG.match(sql, i)
            if m is None:  # `$1`, `${arg}`
                i += 1
                continue
            close = sql.find(m.group(), m.end())
            end = n if close < 0 else close + len(m.group())
            emit("literal", i, end)
            i = end
        else:
            i += 1
    if code_start < n:
        regions.append(("code", sql[code_start:]))
    return regions


_TEXT_ARG = re.compile(r"\$\{([A-Za-z0-9_]+)\}")
_CODE_TOKENS = re.compile(r"\$\{(?P<text>[A-Za-z0-9_]+)\}|::|:=|:(?P<bind>[A-Za-z_][A-Za-z0-9_]*)|%")
_LITERAL_TOKENS = re.compile(r"\$\{(?P<text>[A-Za-z0-9_]+)\}|%")


def render_sql(sql: str, instance: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """Turn PgQuartz SQL into a psycopg query and its params for one matrix instance.

    * `:arg` (a matrix argument, outside string literals and comments) -> `%(arg)s` bind parameter;
      `::type` casts, `:=` and `:names` that are not matrix arguments are left alone. pgquartz does
      a blind text replace instead, which also hits `::arg` and `:arg_suffix`.
    * `${arg}` -> the value as plain text, anywhere (also inside quotes, as in pgquartz). It is not
      escaped: it is for identifiers chosen by the job author, never for data.
    * every literal `%` -> `%%`, because psycopg parses placeholders in the whole query text.
    """
    params: dict[str, str] = {}

    def code(m: re.Match[str]) -> str:
        if m.group("text") is not None:
            name = m.group("text")
            return str(instance[name]).replace("%", "%%") if name in instance else m.group()
        if m.group("bind") is not None:
            name = m.group("bind")
            if name not in instance:
                return m.group()
            params[name] = str(instance[name])
            return f"%({name})s"
        if m.group() == "%":
            return "%%"
        return m.group()

    def literal(m: re.Match[str]) -> str:
        if m.group("text") is not None:
            name = m.group("text")
            return str(instance[name]).replace("%", "%%") if name in instance else m.group()
        return "%%"

    out = [_CODE_TOKENS.sub(code, text) if kind == "code" else _LITERAL_TOKENS.sub(literal, text)
           for kind, text in _sql_regions(sql)]
    return "".join(out), params


def sql_text_args(sql: str) -> set[str]:
    """The `${arg}` names used in `sql` (for checking them against the matrix)."""
    return set(_TEXT_ARG.findall(sql))


def split_batch(sql: str) -> list[str]:
    """Statements of a `batchMode` SQL text: split on `;` outside quotes, dollar quotes and comments.

    Empty and comment-only pieces are dropped. pgquartz splits on every `;` blindly, which breaks
    `'a;b'` and function bodies; files that work there split the same way here.
    """
    pieces: list[list[tuple[str, str]]] = [[]]
    for kind, text in _sql_regions(sql):
        if kind != "code":
            pieces[-1].append((kind, text))
            continue
        parts = text.split(";")
        pieces[-1].append((kind, parts[0]))
        for part in parts[1:]:
            pieces.append([(kind, part)])
    statements = []
    for piece in pieces:
        if any(kind == "literal" or (kind == "code" and text.strip()) for kind, text in piece):
            statements.append("".join(text for _, text in piece).strip())
    return statements


def format_sql_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Rows as pgquartz prints them: `{col}={value}` joined by ", ", `'` doubled, one line per row.

    (The pgquartz code uses braces; a plain `col=value` description is not what it emits.)
    Values print like Go's fmt.Sprint for the common types: NULL -> `<nil>`, bools lower case.
    """

    def text(value: Any) -> str:
        if value is None:
            return "<nil>"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return [", ".join(f"{{{col}}}={{{text(val).replace(chr(39), chr(39) * 2)}}}" for col, val in zip(columns, row, strict=True))
            for row in rows]


def effective_role(job: Job, command: Command) -> str | None:
    """The role the SQL command's server must have: the command's own, else its connection's.

    None for shell commands (pgquartz checks no role for them) and for unknown connections.
    """
    if command.is_shell:
        return None
    conn = job.connections.get(command.type)
    if conn is None:
        return None
    return command.role or conn.role


# pgquartz's role query (pkg/pg/conn.go VerifyRole), run before every SQL command on the
# connection the command then uses; role `all` skips it.
ROLE_QUERY = "select case pg_is_in_recovery() when true then 'standby' else 'primary' end"


def role_problem(wanted: str | None, actual: Any) -> str | None:
    """Why a SQL command must not run on a server whose ROLE_QUERY answered `actual`, or None.

    `wanted` is `effective_role`; None (shell) and `all` never refuse. A refused command counts
    as failed (rc 1, no output), as in pgquartz, which logs "skipping command" and moves on.
    """
    if wanted in (None, "all") or actual == wanted:
        return None
    return f"the server is {actual}, this command needs the {wanted} (role check before every SQL command)"


# --------------------------------------------------------------------------- command output

# What one command printed: raw text (shell) or lines (SQL rows from `format_sql_rows`).
Output = str | Sequence[str]


def command_output(command: Command, rc: int, stdout: Output, stderr: Output = "") -> tuple[list[str], list[str]]:
    """The stdout and stderr lines pgquartz keeps of one step command: none at all when it failed
    (rc ≠ 0; pgquartz never stores a failed command's output, shell or SQL); else shell output
    split like `output_lines` (empty output is one empty line) and SQL rows as they are, with no
    stderr (pgquartz records none for SQL)."""
    if rc != 0:
        return [], []
    if command.is_shell:
        return list(result_lines(stdout)), list(result_lines(stderr))
    return list(result_lines(stdout)), []


def run_commands(commands: Sequence[Command], run: Callable[[Command], tuple[int, Output, Output]],
                 instance: Mapping[str, str] | None = None) -> InstanceResult:
    """One step instance, as pgquartz runs it: `run` each command in order until one fails.

    Returns the instance's result: rc is that of the failed command (0 if none failed; the
    others are 0), the outputs are the lines `command_output` keeps, in command order.
    """
    rc, out, err = 0, [], []
    for command in commands:
        code, stdout, stderr = run(command)
        kept_out, kept_err = command_output(command, code, stdout, stderr)
        out += kept_out
        err += kept_err
        if code != 0:
            rc = code
            break
    return InstanceResult(instance=dict(instance or {}), rc=rc, stdout=out, stderr=err)


# --------------------------------------------------------------------------- checks


def _match(check: Check, stream: str, lines: Sequence[str]) -> str | None:
    rendered = render_result(lines)
    shown = rendered if len(rendered) <= 200 else rendered[:197] + "..."
    if check.expected and check.expected not in rendered:
        return f"expected text {check.expected!r} not found in {stream} {shown}"
    if check.unexpected and check.unexpected in rendered:
        return f"unexpected text {check.unexpected!r} found in {stream} {shown}"
    return None


def check_passed(check: Check, rc: int, stdout: Output, stderr: Output = "") -> tuple[bool, str]:
    """Verdict for one check instance: `(passed, reason)`.

    `rc`: the shell exit code; for SQL 0 = the query succeeded, anything else = it failed.
    `stdout` / `stderr`: raw text or lines (SQL: the rows from `format_sql_rows`).

    Shell: the exit code must equal `check.rc`. (pgquartz does not notice a check expecting
    `rc: N≠0` that exits 0; we do, since checks are the only proof that a job did its work.)
    SQL: `check.rc` 0 means the query must succeed, anything else means it must fail.

    Then, as pgquartz's CheckOutput: `expected` must be and `unexpected` must not be a substring
    of the output's quoted rendering (`render_result`: `[ 'line', 'it''s' ]`, so it may span lines
    and a `'` in the output is `''`). A shell check tests stdout and then stderr separately, so
    `expected` has to appear in both; a SQL check tests its rows only, and a failed query has
    none (its rendering is `[  ]`).
    """
    if check.is_shell:
        if rc != check.rc:
            return False, f"exit code {rc}, expected {check.rc}"
        streams = (("stdout", result_lines(stdout)), ("stderr", result_lines(stderr)))
    else:
        if check.rc == 0 and rc != 0:
            return False, "query failed but was expected to succeed"
        if check.rc != 0 and rc == 0:
            return False, f"query succeeded but was expected to fail (rc: {check.rc})"
        streams = (("stdout", result_lines(stdout) if rc == 0 else ()),)
    for stream, lines in streams:
        problem = _match(check, stream, lines)
        if problem:
            return False, problem
    return True, "ok"
