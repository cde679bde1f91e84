"""What a PgQuartz `when` rule sees, and just enough of Go's text/template to evaluate it.

PgQuartz runs each rule through Go's text/template with the job handler as data. A rule without
`{{ }}` is wrapped as `{{if RULE }}True{{end}}`, and a rule is true only when the template renders
exactly `True`. We re-implement the subset real jobs use instead of shelling out to Go, and we
fail loudly (`WhenExpressionError`) where Go would have produced an error at run time, so that
the loader can reject a bad rule before the job ever takes its lock.

Supported: fields `.Steps.<name>.Rc|StdOut|StdErr|Instances(.Rc|.StdOut|.StdErr)`, the result
methods `Contains`, `ContainsLine`, `RegExpContains`, `String`, the functions `eq ne lt le gt ge and
or not len index`, `( )` grouping, pipes, string/raw-string/integer/bool literals and the
`if`/`else`/`end` actions with `{{-`/`-}}` trimming. Everything else is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from tasks.errors import BouwsteenError

__all__ = [
    "WhenExpressionError", "InstanceResult", "StepResult", "output_lines", "result_lines", "render_result",
    "evaluate_when", "when_step_refs",
]


class WhenExpressionError(BouwsteenError, ValueError):
    """A `when` rule that cannot be parsed or evaluated (unknown function, unknown step, type error)."""


def output_lines(text: str) -> tuple[str, ...]:
    """Split command output into lines exactly like PgQuartz's NewResultFromString.

    One trailing newline is dropped, so `ContainsLine` matches the last line of `echo ok`; empty
    output is one empty line.
    """
    if text.endswith("\n"):
        text = text[:-1]
    return tuple(text.split("\n"))


def result_lines(output: str | Sequence[str]) -> tuple[str, ...]:
    """Lines of an output: raw text is split like `output_lines`, a sequence already is the lines.

    Zero lines (a failed command, a query without rows) can only be given as a sequence.
    """
    if isinstance(output, str):
        return output_lines(output)
    return tuple(str(line) for line in output)


def render_result(lines: Sequence[str]) -> str:
    """PgQuartz's `Result.String()`: `[ 'line 1', 'it''s' ]`, each `'` doubled; no lines: `[  ]`.

    Checks match `expected` / `unexpected` as substrings of this one rendered line, not of the
    raw output (pkg/jobs/check.go CheckOutput).
    """
    return "[ " + ", ".join("'" + line.replace("'", "''") + "'" for line in lines) + " ]"


@dataclass(frozen=True)
class InstanceResult:
    """The outcome of one matrix instance of a step: its commands' summed rc and their output.

    `stdout` / `stderr`: raw text (split like `output_lines`) or the lines themselves. The runner
    gives lines, as pgquartz keeps them: per command that succeeded, its stdout and stderr lines
    (SQL: the rows from `format_sql_rows`, no stderr); nothing of a command that failed.
    """

    instance: Mapping[str, str] = field(default_factory=dict)
    rc: int = 0
    stdout: str | Sequence[str] = ""
    stderr: str | Sequence[str] = ""

    def __post_init__(self) -> None:
        for name in ("stdout", "stderr"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    @property
    def stdout_lines(self) -> tuple[str, ...]:
        return result_lines(self.stdout)

    @property
    def stderr_lines(self) -> tuple[str, ...]:
        return result_lines(self.stderr)


@dataclass(frozen=True)
class StepResult:
    """What `when` rules of later steps see of a finished step.

    A step skipped by its own `when` counts as done in PgQuartz with Rc 0 and no output, which is
    exactly `StepResult()`.
    """

    instances: Sequence[InstanceResult] = ()

    def __post_init__(self) -> None:
        # Accept a list from callers but keep the frozen object really immutable.
        object.__setattr__(self, "instances", tuple(self.instances))

    @property
    def rc(self) -> int:
        return sum(i.rc for i in self.instances)

    @property
    def stdout_lines(self) -> tuple[str, ...]:
        return tuple(line for i in self.instances for line in i.stdout_lines)

    @property
    def stderr_lines(self) -> tuple[str, ...]:
        return tuple(line for i in self.instances for line in i.stderr_lines)


# --------------------------------------------------------------------------- values seen by rules


@dataclass(frozen=True)
class _Lines:
    """PgQuartz's `Result`: a list of output lines with a few search methods."""

    lines: tuple[str, ...]

    def go_string(self) -> str:
        return render_result(self.lines)


@dataclass(frozen=True)
class _Instances:
    step: StepResult


@dataclass(frozen=True)
class _Steps:
    results: Mapping[str, StepResult]


class _Root:
    """The template's dot: PgQuartz passes its Handler; we only model `.Steps`."""


_ROOT = _Root()
_MISSING: Any = object()  # "no piped value", distinct from a piped nil


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class _Field:
    names: tuple[str, ...]  # `.Steps.a.Rc` -> ("Steps", "a", "Rc")


@dataclass(frozen=True)
class _Chain:
    base: "_PipeArg"
    names: tuple[str, ...]  # `(index .Steps "a").Rc`


@dataclass(frozen=True)
class _Ident:
    name: str  # a function name


@dataclass(frozen=True)
class _Literal:
    value: Any  # str, int, bool or None


@dataclass(frozen=True)
class _Dot:
    pass


@dataclass(frozen=True)
class _PipeArg:
    pipe: "_Pipe"


_Operand = _Field | _Chain | _Ident | _Literal | _Dot | _PipeArg


@dataclass(frozen=True)
class _Command:
    args: tuple[_Operand, ...]


@dataclass(frozen=True)
class _Pipe:
    commands: tuple[_Command, ...]


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Action:
    pipe: _Pipe


@dataclass
class _If:
    pipe: _Pipe
    then: list["_Node"] = field(default_factory=list)
    otherwise: list["_Node"] = field(default_factory=list)


_Node = _Text | _Action | _If


# --------------------------------------------------------------------------- lexer


@dataclass(frozen=True)
class _Tok:
    kind: str  # field dot ident string number lparen rparen pipe eof
    value: Any
    pos: int
    space_before: bool


_SPACE = " \t\r\n"
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
               '"': '"', "'": "'"}
_NUMBER = re.compile(r"[+-]?[0-9][0-9A-Za-z_.]*")
_UNSUPPORTED_KEYWORDS = {"range", "with", "define", "template", "block", "break", "continue"}


def _is_word(c: str) -> bool:
    return c == "_" or c.isalnum()


def _unquote_go(body: str, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            raise WhenExpressionError(f"bad escape at offset {pos + i}")
        e = body[i + 1]
        if e in _GO_ESCAPES:
            out.append(_GO_ESCAPES[e])
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise WhenExpressionError(f"bad \\{e} escape at offset {pos + i}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        elif e in "01234567":
            digits = body[i + 1:i + 4]
            if len(digits) != 3 or not all(d in "01234567" for d in digits):
                raise WhenExpressionError(f"bad octal escape at offset {pos + i}")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise WhenExpressionError(f"unknown escape \\{e} at offset {pos + i}")
    return "".join(out)


def _parse_int(text: str, pos: int) -> int:
    # Go's strconv base 0: 0x.., 0o.., 0b.., legacy 0NNN octal, `_` separators.
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-").replace("_", "")
    try:
        if re.fullmatch(r"0[0-7]+", digits):
            return sign * int(digits, 8)
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|[0-9]+", digits):
            return sign * int(digits, 0)
    except ValueError:
        pass
    raise WhenExpressionError(
        f"number {text!r} at offset {pos} is not supported; only integer constants are (Rc is an int)")


def _lex(src: str, base: int) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n, space = 0, len(src), False

    def add(kind: str, value: Any, at: int) -> None:
        nonlocal space
        toks.append(_Tok(kind, value, base + at, space))
        space = False

    while i < n:
        c = src[i]
        if c in _SPACE:
            space = True
            i += 1
        elif c == ".":
            if i + 1 < n and src[i + 1].isdigit():
                raise WhenExpressionError(f"number {src[i:]!r} at offset {base + i} is not supported")
            j = i + 1
            while j < n and _is_word(src[j]):
                j += 1
            if j == i + 1:
                add("dot", ".", i)
            else:
                add("field", src[i + 1:j], i)
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                if src[j] == "\n":
                    break
                j += 2 if src[j] == "\\" else 1
            if j >= n or src[j] != '"':
                raise WhenExpressionError(f"unterminated string at offset {base + i}")
            add("string", _unquote_go(src[i + 1:j], base + i + 1), i)
            i = j + 1
        elif c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise WhenExpressionError(f"unterminated raw string at offset {base + i}")
            add("string", src[i + 1:j], i)
            i = j + 1
        elif c == "'":
            raise WhenExpressionError(f"character constants are not supported (offset {base + i}); use \"...\"")
        elif c in "()|":
            add({"(": "lparen", ")": "rparen", "|": "pipe"}[c], c, i)
            i += 1
        elif c.isdigit() or (c in "+-" and i + 1 < n and src[i + 1].isdigit()):
            m = _NUMBER.match(src, i)
            assert m is not None
            add("number", _parse_int(m.group(), base + i), i)
            i = m.end()
        elif _is_word(c):
            j = i
            while j < n and _is_word(src[j]):
                j += 1
            add("ident", src[i:j], i)
            i = j
        elif c == "$":
            raise WhenExpressionError(f"template variables are not supported (offset {base + i})")
        else:
            raise WhenExpressionError(f"unexpected {c!r} at offset {base + i}")
    toks.append(_Tok("eof", None, base + n, space))
    return toks


# --------------------------------------------------------------------------- parser


class _PipeParser:
    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.i = 0

    @property
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def pipeline(self) -> _Pipe:
        commands = [self.command()]
        while self.peek.kind == "pipe":
            self.next()
            commands.append(self.command())
        return _Pipe(tuple(commands))

    def command(self) -> _Command:
        args: list[_Operand] = []
        while self.peek.kind not in ("pipe", "rparen", "eof"):
            args.append(self.operand())
        if not args:
            raise WhenExpressionError(f"missing value at offset {self.peek.pos}")
        return _Command(tuple(args))

    def _field_names(self) -> list[str]:
        names: list[str] = []
        while self.peek.kind == "field" and not self.peek.space_before:
            names.append(self.next().value)
        return names

    def operand(self) -> _Operand:
        tok = self.next()
        node: _Operand
        if tok.kind == "field":
            node = _Field(tuple([tok.value, *self._field_names()]))
        elif tok.kind == "dot":
            node = _Dot()
        elif tok.kind == "string" or tok.kind == "number":
            node = _Literal(tok.value)
        elif tok.kind == "ident":
            if tok.value in ("true", "false"):
                node = _Literal(tok.value == "true")
            elif tok.value == "nil":
                node = _Literal(None)
            elif tok.value in ("if", "else", "end") or tok.value in _UNSUPPORTED_KEYWORDS:
                raise WhenExpressionError(f"unexpected keyword {tok.value!r} at offset {tok.pos}")
            else:
                node = _Ident(tok.value)
        elif tok.kind == "lparen":
            inner = self.pipeline()
            if self.next().kind != "rparen":
                raise WhenExpressionError(f"unclosed '(' at offset {tok.pos}")
            node = _PipeArg(inner)
        else:
            raise WhenExpressionError(f"unexpected {tok.value!r} at offset {tok.pos}")
        if self.peek.kind == "field" and not self.peek.space_before:
            if not isinstance(node, _PipeArg):
                raise WhenExpressionError(f"unexpected . after term at offset {self.peek.pos}")
            node = _Chain(node, tuple(self._field_names()))
        return node


def _parse_pipe(src: str, base: int) -> _Pipe:
    parser = _PipeParser(_lex(src, base))
    pipe = parser.pipeline()
    if parser.peek.kind != "eof":
        raise WhenExpressionError(f"unexpected {parser.peek.value!r} at offset {parser.peek.pos}")
    return pipe


def _find_action_end(src: str, start: int, shift: int) -> int:
    """Index of the `}}` closing the action that starts at `start`, skipping string literals."""
    i = start
    while i < len(src):
        c = src[i]
        if c == '"':
            opened = i
            i += 1
            while i < len(src) and src[i] not in '"\n':
                i += 2 if src[i] == "\\" else 1
            if i >= len(src) or src[i] != '"':
                raise WhenExpressionError(f"unterminated string at offset {max(opened - shift, 0)}")
        elif c == "`":
            opened = i
            i = src.find("`", i + 1)
            if i < 0:
                raise WhenExpressionError(f"unterminated raw string at offset {max(opened - shift, 0)}")
        elif src.startswith("}}", i):
            return i
        i += 1
    raise WhenExpressionError(f"unclosed action starting at offset {max(start - 2 - shift, 0)}")


def _parse_template(src: str, shift: int = 0) -> list[_Node]:
    """Parse a template; `shift` is subtracted from offsets so errors point into the rule as written."""
    root: list[_Node] = []
    # One frame per open `if` chain: the list being filled, its `if`, and whether we are in `else`.
    frames: list[tuple[list[_Node], _If | None, bool]] = [(root, None, False)]
    i = 0
    trim_next = False
    while True:
        j = src.find("{{", i)
        text = src[i:] if j < 0 else src[i:j]
        if trim_next:
            text = text.lstrip(_SPACE)
        start = j + 2
        if j >= 0 and j + 3 < len(src) and src[j + 2] == "-" and src[j + 3] in _SPACE:
            text = text.rstrip(_SPACE)
            start = j + 3
        if text:
            frames[-1][0].append(_Text(text))
        if j < 0:
            break
        end = _find_action_end(src, start, shift)
        content_end = end
        trim_next = False
        if end - 2 >= start and src[end - 1] == "-" and src[end - 2] in _SPACE:
            content_end = end - 1
            trim_next = True
        content = src[start:content_end]
        i = end + 2
        stripped = content.strip(_SPACE)
        if stripped.startswith("/*"):
            if not stripped.endswith("*/"):
                raise WhenExpressionError(f"unclosed comment at offset {j - shift}")
            continue
        base = start - shift
        toks = _lex(content, base)
        head = toks[0]
        keyword = head.value if head.kind == "ident" else None
        if keyword == "if":
            node = _If(_parse_pipe(content[head.pos - base + 2:], head.pos + 2))
            frames[-1][0].append(node)
            frames.append((node.then, node, False))
        elif keyword == "else":
            _, owner, in_else = frames.pop()
            if owner is None or in_else:
                raise WhenExpressionError(f"unexpected {{{{else}}}} at offset {j - shift}")
            if toks[1].kind == "ident" and toks[1].value == "if":
                # `else if X` is sugar for `else {{if X}}...{{end}}` that shares the outer `end`.
                nested = _If(_parse_pipe(content[toks[1].pos - base + 2:], toks[1].pos + 2))
                owner.otherwise.append(nested)
                frames.append((nested.then, nested, False))
            elif toks[1].kind != "eof":
                raise WhenExpressionError(f"unexpected text after else at offset {toks[1].pos}")
            else:
                frames.append((owner.otherwise, owner, True))
        elif keyword == "end":
            if toks[1].kind != "eof":
                raise WhenExpressionError(f"unexpected text after end at offset {toks[1].pos}")
            _, owner, _ = frames.pop()
            if owner is None:
                raise WhenExpressionError(f"unexpected {{{{end}}}} at offset {j - shift}")
        elif keyword in _UNSUPPORTED_KEYWORDS:
            raise WhenExpressionError(f"template action {keyword!r} is not supported (offset {head.pos})")
        else:
            frames[-1][0].append(_Action(_parse_pipe(content, base)))
    if len(frames) != 1:
        raise WhenExpressionError("unexpected end of rule: missing {{end}}")
    return root


# --------------------------------------------------------------------------- evaluation


def _truth(value: Any) -> bool:
    # Go's text/template truth: zero values and empty collections are false, structs are true.
    if value is None:
        return False
    if isinstance(value, (bool, int, str)):
        return bool(value)
    if isinstance(value, _Lines):
        return bool(value.lines)
    if isinstance(value, _Steps):
        return bool(value.results)
    if isinstance(value, _Instances):
        return bool(value.step.instances)
    return True


def _render(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, _Lines):
        return value.go_string()
    return f"<{type(value).__name__.lstrip('_')}>"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "nil"
    return type(value).__name__.lstrip("_")


def _typename(value: Any) -> str:
    return {"Lines": "output", "Steps": "steps", "StepResult": "step", "Instances": "instances"}.get(
        _kind(value), _kind(value))


def _eq(values: list[Any]) -> bool:
    if len(values) < 2:
        raise WhenExpressionError("eq: missing argument for comparison")
    first = values[0]
    for other in values[1:]:
        if first is None or other is None:
            if first is other:
                return True
            continue
        kinds = {_kind(first), _kind(other)}
        if not kinds <= {"bool", "int", "string"}:
            raise WhenExpressionError(f"eq: cannot compare {_typename(first)} with {_typename(other)}")
        if len(kinds) != 1:
            raise WhenExpressionError(
                f"eq: incompatible types for comparison: {_kind(first)} {first!r} and {_kind(other)} {other!r}")
        if first == other:
            return True
    return False


def _ordered(name: str, values: list[Any]) -> tuple[Any, Any]:
    if len(values) != 2:
        raise WhenExpressionError(f"{name}: wrong number of args: want 2 got {len(values)}")
    a, b = values
    if _kind(a) not in ("int", "string") or _kind(b) not in ("int", "string"):
        raise WhenExpressionError(f"{name}: invalid type for comparison: {_typename(a)}, {_typename(b)}")
    if _kind(a) != _kind(b):
        raise WhenExpressionError(
            f"{name}: incompatible types for comparison: {_kind(a)} {a!r} and {_kind(b)} {b!r}")
    return a, b


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}
_FUNCTIONS = {"and", "or", "not", "eq", "ne", "len", "index", *_COMPARE}


class _Evaluator:
    def __init__(self, results: Mapping[str, StepResult], *, eager: bool) -> None:
        self.steps = _Steps(results)
        # eager: evaluate every branch (and/or operands, both if-branches) so that the loader
        # reports errors hidden behind short-circuits before the rule ever runs for real.
        self.eager = eager

    def render(self, nodes: list[_Node]) -> str:
        out: list[str] = []
        for node in nodes:
            if isinstance(node, _Text):
                out.append(node.text)
            elif isinstance(node, _Action):
                out.append(_render(self.pipe(node.pipe)))
            else:
                chosen = _truth(self.pipe(node.pipe))
                then = self.render(node.then) if chosen or self.eager else ""
                otherwise = self.render(node.otherwise) if not chosen or self.eager else ""
                out.append(then if chosen else otherwise)
        return "".join(out)

    def pipe(self, pipe: _Pipe) -> Any:
        value: Any = _MISSING
        for command in pipe.commands:
            value = self.command(command, value)
        return value

    def command(self, command: _Command, final: Any) -> Any:
        first, rest = command.args[0], list(command.args[1:])
        if isinstance(first, _Field):
            return self.field_chain(_ROOT, first.names, rest, final)
        if isinstance(first, _Chain):
            return self.field_chain(self.arg(first.base), first.names, rest, final)
        if isinstance(first, _Ident):
            return self.call(first.name, rest, final)
        if rest or final is not _MISSING:
            raise WhenExpressionError(f"can't give argument to non-function {_describe(first)}")
        return self.arg(first)

    def arg(self, node: _Operand) -> Any:
        if isinstance(node, _Literal):
            return node.value
        if isinstance(node, _Dot):
            return _ROOT
        if isinstance(node, _Field):
            return self.field_chain(_ROOT, node.names, [], _MISSING)
        if isinstance(node, _Chain):
            return self.field_chain(self.arg(node.base), node.names, [], _MISSING)
        if isinstance(node, _PipeArg):
            return self.pipe(node.pipe)
        return self.call(node.name, [], _MISSING)

    def args(self, nodes: list[_Operand], final: Any) -> list[Any]:
        values = [self.arg(n) for n in nodes]
        if final is not _MISSING:
            values.append(final)
        return values

    def field_chain(self, receiver: Any, names: Sequence[str], rest: list[_Operand], final: Any) -> Any:
        for name in names[:-1]:
            receiver = self.field(receiver, name, [])
        return self.field(receiver, names[-1], self.args(rest, final))

    def field(self, receiver: Any, name: str, args: list[Any]) -> Any:
        if isinstance(receiver, _Lines):
            return _result_method(receiver, name, args)

        def plain(value: Any) -> Any:
            if args:
                raise WhenExpressionError(f"{name} is not a method but has arguments")
            return value

        if isinstance(receiver, _Root):
            if name == "Steps":
                return plain(self.steps)
            raise WhenExpressionError(f"unsupported field .{name}: rules can only read .Steps")
        if isinstance(receiver, _Steps):
            return plain(_lookup_step(receiver, name))
        if isinstance(receiver, StepResult):
            attrs = {"Rc": receiver.rc, "StdOut": _Lines(receiver.stdout_lines),
                     "StdErr": _Lines(receiver.stderr_lines), "Instances": _Instances(receiver)}
            if name in attrs:
                return plain(attrs[name])
            raise WhenExpressionError(f"unknown field .{name} on a step (have Rc, StdOut, StdErr, Instances)")
        if isinstance(receiver, _Instances):
            step = receiver.step
            attrs = {"Rc": step.rc, "StdOut": _Lines(step.stdout_lines), "StdErr": _Lines(step.stderr_lines)}
            if name in attrs:
                return plain(attrs[name])
            raise WhenExpressionError(f"unknown field .{name} on Instances (have Rc, StdOut, StdErr)")
        raise WhenExpressionError(f"can't evaluate field {name} in type {_typename(receiver)}")

    def call(self, name: str, nodes: list[_Operand], final: Any) -> Any:
        if name not in _FUNCTIONS:
            raise WhenExpressionError(
                f"unknown function {name!r} (supported: {', '.join(sorted(_FUNCTIONS))}; "
                f"output searches are methods: .StdOut.Contains \"text\")")
        if name in ("and", "or"):
            return self.and_or(name, nodes, final)
        values = self.args(nodes, final)
        if name == "not":
            if len(values) != 1:
                raise WhenExpressionError(f"not: wrong number of args: want 1 got {len(values)}")
            return not _truth(values[0])
        if name == "eq":
            return _eq(values)
        if name == "ne":
            if len(values) != 2:
                raise WhenExpressionError(f"ne: wrong number of args: want 2 got {len(values)}")
            return not _eq(values)
        if name in _COMPARE:
            a, b = _ordered(name, values)
            return _COMPARE[name](a, b)
        if name == "len":
            return _len(values)
        return _index(values)

    def and_or(self, name: str, nodes: list[_Operand], final: Any) -> Any:
        # Go >= 1.18 short-circuits and returns the deciding operand itself, not a bool.
        thunks: list[Callable[[], Any]] = [lambda n=n: self.arg(n) for n in nodes]  # type: ignore[misc]
        if final is not _MISSING:
            thunks.append(lambda: final)
        if not thunks:
            raise WhenExpressionError(f"{name}: wrong number of args: want at least 1 got 0")
        decided: Any = _MISSING
        value: Any = None
        for thunk in thunks:
            value = thunk()
            if decided is _MISSING and (_truth(value) if name == "or" else not _truth(value)):
                decided = value
                if not self.eager:
                    break
        return value if decided is _MISSING else decided


def _describe(node: _Operand) -> str:
    if isinstance(node, _Literal):
        return repr(node.value)
    return type(node).__name__.lstrip("_").lower()


def _lookup_step(steps: _Steps, name: str) -> StepResult:
    if name not in steps.results:
        known = ", ".join(sorted(steps.results)) or "none"
        raise WhenExpressionError(f"unknown step {name!r} (results available for: {known})")
    return steps.results[name]


def _result_method(lines: _Lines, name: str, args: list[Any]) -> Any:
    if name == "String":
        if args:
            raise WhenExpressionError(f"String: wrong number of args: want 0 got {len(args)}")
        return lines.go_string()
    if name not in ("Contains", "ContainsLine", "RegExpContains"):
        raise WhenExpressionError(
            f"unknown method .{name} on output (have Contains, ContainsLine, RegExpContains, String)")
    if len(args) != 1:
        raise WhenExpressionError(f"{name}: wrong number of args: want 1 got {len(args)}")
    needle = args[0]
    if not isinstance(needle, str):
        raise WhenExpressionError(f"{name}: wrong type for value; expected string; got {_kind(needle)}")
    if name == "Contains":
        return any(needle in line for line in lines.lines)
    if name == "ContainsLine":
        return needle in lines.lines
    try:
        # Go uses RE2; Python's re accepts the same everyday syntax. PgQuartz logs a bad pattern and
        # returns false; we raise so the loader rejects the rule instead of silently skipping a step.
        pattern = re.compile(needle)
    except re.error as exc:
        raise WhenExpressionError(f"RegExpContains: invalid regular expression {needle!r}: {exc}") from None
    return any(pattern.search(line) for line in lines.lines)


def _len(values: list[Any]) -> int:
    if len(values) != 1:
        raise WhenExpressionError(f"len: wrong number of args: want 1 got {len(values)}")
    value = values[0]
    if isinstance(value, str):
        return len(value.encode())  # Go's len counts bytes
    if isinstance(value, _Lines):
        return len(value.lines)
    if isinstance(value, _Steps):
        return len(value.results)
    if isinstance(value, _Instances):
        return len(value.step.instances)
    raise WhenExpressionError(f"len of type {_typename(value)}")


def _index(values: list[Any]) -> Any:
    if len(values) < 2:
        raise WhenExpressionError("index: want a collection and at least one key")
    value = values[0]
    for key in values[1:]:
        if isinstance(value, _Steps) and isinstance(key, str):
            value = _lookup_step(value, key)
        elif isinstance(value, _Lines) and isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(value.lines):
                raise WhenExpressionError(f"index: index out of range: {key}")
            value = value.lines[key]
        else:
            raise WhenExpressionError(f"index: can't index {_typename(value)} with {_kind(key)}")
    return value


# --------------------------------------------------------------------------- public entry points


_WRAP_PREFIX = "{{if "


def _parse_rule(rule: str) -> list[_Node]:
    if not isinstance(rule, str):
        raise WhenExpressionError(f"a rule must be a string, got {type(rule).__name__}")
    if not rule.strip():
        raise WhenExpressionError("empty rule")
    # PgQuartz's own test: only a rule lacking either brace pair gets wrapped in an `if`.
    if "{{" not in rule or "}}" not in rule:
        return _parse_template(f"{_WRAP_PREFIX}{rule} }}}}True{{{{end}}}}", shift=len(_WRAP_PREFIX))
    return _parse_template(rule)


def evaluate_when(rule: str, step_results: Mapping[str, StepResult]) -> bool:
    """True when `rule` renders exactly `True`, as in PgQuartz.

    A brace-less rule (the usual form, e.g. `eq .Steps.analyze.Rc 0`) is true when its value is
    truthy. A rule written with `{{ }}` must itself render `True`; note that `{{ eq ... }}` renders
    `true` (lower case) and is therefore false in PgQuartz too.
    """
    return _Evaluator(step_results, eager=False).render(_parse_rule(rule)) == "True"


def _walk(nodes: Sequence[_Node]) -> Iterator[_Pipe]:
    for node in nodes:
        if isinstance(node, _Action):
            yield node.pipe
        elif isinstance(node, _If):
            yield node.pipe
            yield from _walk(node.then)
            yield from _walk(node.otherwise)


def _pipe_refs(pipe: _Pipe, found: set[str]) -> None:
    for command in pipe.commands:
        args = command.args
        if isinstance(args[0], _Ident) and args[0].name == "index" and len(args) >= 2:
            if isinstance(args[1], _Field) and args[1].names == ("Steps",):
                if len(args) < 3 or not isinstance(args[2], _Literal) or not isinstance(args[2].value, str):
                    raise WhenExpressionError(
                        "index .Steps needs a literal step name so dependencies can be checked")
                found.add(args[2].value)
        for arg in args:
            if isinstance(arg, _Field) and arg.names[0] == "Steps" and len(arg.names) >= 2:
                found.add(arg.names[1])
            elif isinstance(arg, _Chain):
                _pipe_refs(arg.base.pipe, found)
            elif isinstance(arg, _PipeArg):
                _pipe_refs(arg.pipe, found)


def when_step_refs(rule: str) -> frozenset[str]:
    """Validate `rule` and return the steps it reads.

    Parses the rule, collects every `.Steps.<name>` / `index .Steps "<name>"`, then evaluates it
    once against empty results with every branch taken, so unknown functions, bad fields, type
    mismatches and invalid regular expressions surface at load time.
    """
    tree = _parse_rule(rule)
    found: set[str] = set()
    for pipe in _walk(tree):
        _pipe_refs(pipe, found)
    _Evaluator({name: StepResult() for name in found}, eager=True).render(tree)
    return frozenset(found)
