"""Pure decisions for change_settings (issue 18): which PostgreSQL parameters may be set to what,
what each change needs (nothing, a reload, a restart), and the order of a rolling restart.

The runbook reads `SETTINGS_QUERY` from the primary into `SettingRow`s and the HA manager's
`ClusterView`; these functions decide over that snapshot only. Values are the text a DBA types
(`{"work_mem": "64MB"}`); they are checked the way PostgreSQL itself parses a setting
(src/backend/utils/misc/guc.c `parse_and_validate_value`, `parse_int`, `parse_real`,
`convert_to_base_unit`; src/backend/utils/adt/bool.c `parse_bool`), so a refusal here is a
refusal PostgreSQL would have given, found before anything was written. Check hooks (a
parameter's own extra validation in C) are not reproduced: PostgreSQL may still refuse a value
that passes here, and the HA manager then reports it.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from tasks.adapters.ha.base import ClusterView, Member
from tasks.errors import BouwsteenError
from tasks.planning.plan import Action, ActionPlan

# Read as a superuser (or a member of pg_read_all_settings): pg_settings leaves out the parameters
# marked superuser-only for other roles, and they would then be refused as unknown.
SETTINGS_QUERY = ("select name, setting, unit, vartype, min_val, max_val, enumvals, context, pending_restart "
                  "from pg_settings")

Needs = Literal["nothing", "reload", "restart"]


class SettingsPlanError(BouwsteenError, ValueError):
    """The settings cannot be planned (invalid parameters) or not restarted in turn (no primary,
    a standby that does not stream, none to switch over to); `reasons` names each."""

    def __init__(self, *reasons: str):
        self.reasons = tuple(reasons)
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class SettingRow:
    """One row of `SETTINGS_QUERY`. `setting`, `min_val` and `max_val` are in the base unit
    `unit` names ('8kB' for shared_buffers: a count of 8 kB blocks), as pg_settings gives them."""

    name: str
    setting: str
    unit: str | None
    vartype: str  # bool | integer | real | string | enum
    min_val: str | None
    max_val: str | None
    enumvals: tuple[str, ...]
    context: str  # internal | postmaster | sighup | superuser-backend | backend | superuser | user
    pending_restart: bool = False

    @classmethod
    def from_record(cls, record: Sequence) -> SettingRow:
        """A row as the driver returns it: enumvals comes as a list (or NULL)."""
        name, setting, unit, vartype, min_val, max_val, enumvals, context, pending = record
        return cls(name, setting or "", unit, vartype, min_val, max_val, tuple(enumvals or ()), context,
                   bool(pending))


# --- PostgreSQL's spelling rules ------------------------------------------------------------------

# pg_strcasecmp and guc_name_compare fold ASCII only; str.lower() would also fold e.g. the Kelvin
# sign to 'k' and accept what PostgreSQL refuses.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# C isspace() in the C locale: what strtol, strtod and convert_to_base_unit skip.
_C_SPACE = " \t\n\v\f\r"


def _fold(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def parse_bool(value: str) -> bool | None:
    """bool.c `parse_bool`: true, false, yes, no, on, off, 1, 0 in any case, or a unique prefix
    ('t', 'of'; 'o' alone is ambiguous). No whitespace is trimmed: the GUC code passes the value
    as it is. None when PostgreSQL would refuse it."""
    v = _fold(value)
    if not v:
        return None
    for word, result in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if v[0] == word[0]:
            return result if word.startswith(v) else None
    if v[0] == "o" and len(v) >= 2:
        if "on".startswith(v):
            return True
        if "off".startswith(v):
            return False
        return None
    return {"1": True, "0": False}.get(v)


# guc.c memory_unit_conversion_table / time_unit_conversion_table, greatest unit first (the
# rounding to the next smaller unit and the SHOW rendering rely on that order), as exact sizes in
# bytes and microseconds. Multipliers are computed as one correctly rounded division of two
# integers, which gives the same double as guc.c's constant expressions.
_MEMORY = {"TB": 1024 ** 4, "GB": 1024 ** 3, "MB": 1024 ** 2, "kB": 1024, "B": 1}
_TIME = {"d": 86_400_000_000, "h": 3_600_000_000, "min": 60_000_000, "s": 1_000_000, "ms": 1000, "us": 1}
_ROW_UNIT = re.compile(r"([0-9]*)(B|kB|MB|ms|s|min)")
_MAX_UNIT_LEN = 3
_INT_MIN, _INT_MAX = -2 ** 31, 2 ** 31 - 1
_LONG_MIN, _LONG_MAX = -2 ** 63, 2 ** 63 - 1

_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_STRTOD = re.compile(r"""[ \t\n\v\f\r]*[+-]?(?:
      (?P<hex>0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?)
    | (?P<dec>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<inf>[iI][nN][fF](?:[iI][nN][iI][tT][yY])?)
    | (?P<nan>[nN][aA][nN](?:\([0-9A-Za-z_]*\))?)
)""", re.VERBOSE)


class _Refused(Exception):
    """Internal: why a value does not parse, as the end of a refusal sentence."""


def _unit_table(unit: str) -> tuple[dict[str, int], int]:
    """The conversion table of a pg_settings unit and the size of one base unit in it."""
    m = _ROW_UNIT.fullmatch(unit)
    if m is None:
        raise _Refused(f"its unit {unit!r} is not one bouwsteen knows")
    count = int(m.group(1) or 1)
    table = _MEMORY if m.group(2) in _MEMORY else _TIME
    return table, count * table[m.group(2)]


def _strtod(text: str) -> tuple[float, int] | None:
    """C strtod on the start of `text`: the value and where parsing stopped; None where strtod
    converts nothing or reports ERANGE (overflow to infinity, underflow to zero)."""
    m = _STRTOD.match(text)
    if m is None:
        return None
    literal = text[:m.end()].strip(_C_SPACE)
    if m.group("nan"):
        return math.nan, m.end()
    try:
        value = float.fromhex(literal) if m.group("hex") else float(literal)
    except OverflowError:
        return None
    if math.isinf(value) and not m.group("inf"):
        return None
    if value == 0:
        mantissa = (re.split(r"[pP]", m.group("hex"))[0][2:] if m.group("hex")
                    else re.split(r"[eE]", m.group("dec") or "")[0])
        if re.search(r"[1-9a-fA-F]", mantissa):
            return None
    return value, m.end()


def _strtol_then_strtod(text: str) -> tuple[float, int] | None:
    """guc.c `parse_int`'s number: strtol with base 0 (hex 0x.., octal 0..), re-parsed with
    strtod when it stops at '.', 'e' or 'E' or overflows a long. Hence '010' is 8 and '08' is 0
    followed by the garbage '8', exactly as PostgreSQL reads them."""
    m = _STRTOL.match(text)
    end, overflow, value = 0, False, 0.0
    if m is not None:
        digits = m.group(2)
        base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
        number = int(digits, base) * (-1 if m.group(1) == "-" else 1)
        overflow = not _LONG_MIN <= number <= _LONG_MAX
        end, value = m.end(), float(number)
    # Where strtol converts nothing it stops at the very start, so '.5' goes to strtod and ' .5'
    # (a space first) does not: PostgreSQL refuses ' .5' for an integer and so does this.
    if text[end:end + 1] in (".", "e", "E") or overflow:
        return _strtod(text)
    return (value, end) if m is not None else None


def _to_base_unit(value: float, rest: str, row: SettingRow) -> float:
    """guc.c `convert_to_base_unit`: the unit after the number, case-sensitive, into the row's
    base unit; a fractional value is rounded to a whole number of the next smaller unit first
    ('30.1GB' is 30822 MB, not 32319628902 B)."""
    if row.unit is None:
        raise _Refused("takes no unit")
    table, base = _unit_table(row.unit)
    word = rest[:_MAX_UNIT_LEN]
    word = word[:next((i for i, c in enumerate(word) if c in _C_SPACE), len(word))]
    names = list(table)
    if rest[len(word):].strip(_C_SPACE) or word not in table:
        raise _Refused(f"has no unit PostgreSQL takes here; the units are {', '.join(reversed(names))} "
                       "(case matters)")
    converted = value * (table[word] / base)
    i = names.index(word)
    if i + 1 < len(names) and math.isfinite(converted):
        step = table[names[i + 1]] / base
        converted = _rint(converted / step) * step
    return converted


def _rint(x: float) -> float:
    # rint() in the default rounding mode rounds half to even, as Python's round() does.
    return float(round(x)) if math.isfinite(x) else x


def _parse_number(value: str, row: SettingRow) -> int | float:
    """An integer or real setting in the row's base unit, or _Refused."""
    parsed = _strtol_then_strtod(value) if row.vartype == "integer" else _strtod(value)
    if parsed is None or math.isnan(parsed[0]):
        raise _Refused("is not a number")
    number, end = parsed
    rest = value[end:].lstrip(_C_SPACE)
    if rest:
        number = _to_base_unit(number, rest, row)
    if row.vartype == "real":
        return number
    number = _rint(number)
    if not _INT_MIN <= number <= _INT_MAX:
        raise _Refused("exceeds the integer range")
    return int(number)


def _setting_number(row: SettingRow) -> int | float | None:
    """The current setting as a number, read as PostgreSQL reads a value: a show hook may print
    it its own way (unix_socket_permissions as '0777', octal). None if it is no number at all."""
    try:
        return _parse_number(row.setting, row)
    except _Refused:
        return None


def _g(x: float) -> str:
    # pg_settings and SHOW print reals with C's %g, which Python's 'g' format reproduces.
    return format(x, "g")


def show(row: SettingRow, base: float | bool | str | None = None) -> str:
    """A value the way SHOW prints it (guc.c `ShowGUCOption` with units, show hooks aside): a
    positive number with a unit in the greatest unit that holds it exactly
    (`convert_int_from_base_unit`; for reals the first within 1e-8 of whole, else the smallest),
    zero and negatives bare, booleans on/off. `base` is a parsed value; None shows the row's
    current setting, which for anything but a number with a unit is pg_settings' own text."""
    if base is None:
        base = _setting_number(row) if row.vartype in ("integer", "real") and row.unit else None
        if base is None:
            return row.setting
    if isinstance(base, bool):
        return "on" if base else "off"
    if isinstance(base, str):
        return base
    if row.unit is None or base <= 0:
        return str(base) if isinstance(base, int) else _g(base)
    table, size = _unit_table(row.unit)
    if isinstance(base, int):
        for unit, bytes_or_us in table.items():
            mult = bytes_or_us / size
            if mult <= 1.0 or base % int(mult) == 0:
                return f"{round(base / mult)}{unit}"
    shown, unit = float(base), ""
    for unit, bytes_or_us in table.items():
        shown = base / (bytes_or_us / size)
        if shown > 0 and abs(round(shown) / shown - 1.0) <= 1e-8:
            break
    return f"{_g(shown)}{unit}"


# --- validation -----------------------------------------------------------------------------------

_CONTEXTS = ("internal", "postmaster", "sighup", "superuser-backend", "backend", "superuser", "user")
_VARTYPES = ("bool", "integer", "real", "string", "enum")


def _control_character(value: str) -> bool:
    # Every value ends up in a configuration file the HA manager writes (postgresql.conf, or
    # stolon's keeper-generated one): a newline there starts a new setting. Tab and carriage
    # return count too; nobody types them into a setting on purpose.
    return any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in value)


def _lookup(rows: Mapping[str, SettingRow]) -> dict[str, SettingRow]:
    # Parameter names are case-insensitive (guc.c guc_name_compare); pg_settings lists them lower.
    return {_fold(name): row for name, row in rows.items()}


def _parsed(value: str, row: SettingRow) -> int | float | bool | str:
    """The value as PostgreSQL would store it, or _Refused."""
    if _control_character(value):
        raise _Refused("holds a control character or newline, which would break the configuration file "
                       "it is written to")
    if row.vartype == "bool":
        result = parse_bool(value)
        if result is None:
            raise _Refused("is no Boolean; PostgreSQL takes on, off, true, false, yes, no, 1, 0 "
                           "or a unique prefix of one")
        return result
    if row.vartype in ("integer", "real"):
        number = _parse_number(value, row)
        cast = int if row.vartype == "integer" else float
        low = cast(row.min_val) if row.min_val is not None else None
        high = cast(row.max_val) if row.max_val is not None else None
        if (low is not None and number < low) or (high is not None and number > high):
            unit = f" {row.unit}" if row.unit else ""
            fmt = str if row.vartype == "integer" else _g
            bounds = f"{'' if low is None else fmt(low)} .. {'' if high is None else fmt(high)}"
            raise _Refused(f"is {fmt(number)}{unit}, outside {bounds}{unit}")
        return number
    if row.vartype == "enum":
        # pg_settings.enumvals leaves out the hidden aliases (synchronous_commit = true is taken
        # by PostgreSQL as 'on'): only the listed spelling passes, so the setting read back after
        # the change matches it and a second run changes nothing.
        match = next((e for e in row.enumvals if _fold(e) == _fold(value)), None)
        if match is None:
            raise _Refused(f"is not one of {', '.join(row.enumvals)}")
        if row.name == "wal_level" and match == "minimal":
            raise _Refused("would stream nothing to the standbys; the cluster needs replica or logical")
        return match
    return value


def validate_settings(requested: Mapping[str, str], rows: Mapping[str, SettingRow]) -> list[str]:
    """One refusal per bad parameter, each starting `parameters.<name>:` (the name as given)."""
    if not requested:
        return ["parameters: no parameter given"]
    by_name = _lookup(rows)
    refusals, seen = [], {}
    for name, value in requested.items():
        row = by_name.get(_fold(name))
        if row is None:
            close = difflib.get_close_matches(_fold(name), list(by_name), n=1, cutoff=0.7)
            hint = f"; did you mean {by_name[close[0]].name}?" if close else ""
            refusals.append(f"parameters.{name}: PostgreSQL has no such parameter{hint}")
            continue
        if row.name in seen:
            refusals.append(f"parameters.{name}: given twice (also as {seen[row.name]})")
            continue
        seen[row.name] = name
        if row.context not in _CONTEXTS or row.vartype not in _VARTYPES:
            refusals.append(f"parameters.{name}: context {row.context!r} / type {row.vartype!r} is not one "
                            "bouwsteen knows how to change")
            continue
        if row.context == "internal":
            refusals.append(f"parameters.{name}: fixed when PostgreSQL was built or the cluster initialised "
                            "(context internal); it cannot be set")
            continue
        if not isinstance(value, str):
            refusals.append(f"parameters.{name}: give the value as text, as in postgresql.conf")
            continue
        try:
            _parsed(value, row)
        except _Refused as why:
            refusals.append(f"parameters.{name}: {value!r} {why}")
    return refusals


# --- planning -------------------------------------------------------------------------------------

# What a changed value in the configuration file needs before it is in effect:
# - sighup: a reload; nothing else can change it.
# - superuser, user: a reload makes it the default of every session, open ones included; a value a
#   role, a database or the session itself set wins over the file's (guc.c ignores a setting from a
#   lower-priority source), which is the point of those overrides, not something to restart for.
# - backend, superuser-backend: the postmaster takes the reloaded value and new sessions start with
#   it; open sessions keep theirs (guc.c ignores a reload for PGC_BACKEND in existing backends).
#   A restart would only cut those sessions short, so a reload it is; the plan says so.
# - postmaster: a reload only marks the parameter pending_restart; the value takes effect at start.
_NEEDS_BY_CONTEXT: dict[str, Needs] = {"sighup": "reload", "superuser": "reload", "user": "reload",
                                       "backend": "reload", "superuser-backend": "reload",
                                       "postmaster": "restart"}

# A hot standby must run with at least the primary's value of these (src/backend/access/transam/
# xlog.c CheckRequiredParameterValues): raised, the standbys go first; lowered, the primary would
# have to go first, and this rolling restart never does that.
_STANDBY_FLOOR = ("max_connections", "max_worker_processes", "max_wal_senders", "max_prepared_transactions",
                  "max_locks_per_transaction")


@dataclass(frozen=True)
class SettingChange:
    name: str  # as pg_settings spells it
    old: str  # current value as SHOW prints it
    new: str  # requested value as SHOW will print it
    value: str  # exactly what the DBA typed: what the HA manager is given
    needs: Needs
    context: str
    lowered: bool = False  # a number set below its current value
    clears_pending: bool = False  # back to the running value; the reload drops a pending restart


def _same(row: SettingRow, new: float | bool | str) -> bool:
    if row.vartype == "bool":
        return parse_bool(row.setting) is new
    if row.vartype in ("integer", "real"):
        current = _setting_number(row)
        if current is None:
            return False
        # pg_settings prints reals with %g (six significant digits): compare as it would print,
        # or a value with more digits reads as changed on every run.
        return current == new if row.vartype == "integer" else _g(float(current)) == _g(float(new))
    if row.vartype == "enum":
        return _fold(row.setting) == _fold(str(new))
    # Exact: a check hook may canonicalise a string (DateStyle, search_path spacing), and then it
    # keeps reading as a change; that costs one reload with no effect, never a restart, for the
    # postmaster strings (shared_preload_libraries, ...) have no such hook.
    return row.setting == new


def plan_settings(requested: Mapping[str, str], rows: Mapping[str, SettingRow]) -> list[SettingChange]:
    """One change per requested parameter, in the order given. Raises SettingsPlanError with the
    `validate_settings` refusals when there are any."""
    refusals = validate_settings(requested, rows)
    if refusals:
        raise SettingsPlanError(*refusals)
    by_name = _lookup(rows)
    changes = []
    for name, value in requested.items():
        row = by_name[_fold(name)]
        new = _parsed(value, row)
        same = _same(row, new)
        needs: Needs = _NEEDS_BY_CONTEXT[row.context]
        # A postmaster parameter whose file value already differs from the running one shows
        # pending_restart; writing the running value back and reloading clears that (guc.c drops
        # GUC_PENDING_RESTART when the reread value equals the running one), so a reload is due,
        # else the next restart would bring in a value nobody asked for now.
        clears_pending = same and row.pending_restart
        if same:
            needs = "reload" if clears_pending else "nothing"
        current = _setting_number(row) if row.vartype in ("integer", "real") else None
        lowered = current is not None and not same and new < current
        # A number without a unit reads best as written ('0700' for a file mode, not 448).
        shown = value.strip(_C_SPACE) if row.vartype in ("integer", "real") and not row.unit else show(row, new)
        changes.append(SettingChange(row.name, show(row), shown, value, needs, row.context,
                                     lowered=lowered, clears_pending=clears_pending))
    return changes


_NEEDS_RANK = {"nothing": 0, "reload": 1, "restart": 2}


def plan_cluster_settings(requested: Mapping[str, str], rows_by_member: Mapping[str, Mapping[str, SettingRow]],
                          primary: str) -> list[SettingChange]:
    """`plan_settings` over every member: the old values are the primary's, and a change needs
    what the member furthest behind needs. A run cut short leaves the new value in the HA
    manager's configuration and some members still on the old one: the rerun finishes their part
    (the standbys already restarted are then skipped by `member_needs_restart`)."""
    changes = plan_settings(requested, rows_by_member[primary])
    for member, rows in rows_by_member.items():
        if member == primary:
            continue
        for i, theirs in enumerate(plan_settings(requested, rows)):
            if _NEEDS_RANK[theirs.needs] > _NEEDS_RANK[changes[i].needs]:
                changes[i] = replace(changes[i], needs=theirs.needs)
    return changes


def member_needs_restart(requested: Mapping[str, str], rows: Mapping[str, SettingRow]) -> list[str]:
    """The requested parameters this member must restart to take: a postmaster parameter whose
    running value is not the requested one, or that pg_settings marks pending_restart. Empty: the
    member already runs every new value and its restart is skipped."""
    by_name = _lookup(rows)
    behind = []
    for name, value in requested.items():
        row = by_name.get(_fold(name))
        if row is None or row.context != "postmaster":
            continue
        try:
            same = _same(row, _parsed(value, row))
        except _Refused:
            same = False
        if not same or row.pending_restart:
            behind.append(row.name)
    return behind


def _requested_rows(requested: Mapping[str, str], rows: Mapping[str, SettingRow]):
    by_name = _lookup(rows)
    for name, value in requested.items():
        row = by_name.get(_fold(name))
        if row is None:
            continue
        try:
            same = _same(row, _parsed(value, row))
        except _Refused:
            same = False
        yield row, same


def not_yet_reloaded(requested: Mapping[str, str], rows: Mapping[str, SettingRow], *, ha_pending: bool) -> list[str]:
    """The requested parameters a member has not reloaded yet: one that a reload brings and it
    does not run, a postmaster one it neither runs nor marks pending (pg_settings, or
    `ha_pending`, the HA manager's flag for the parameters it passes on the command line), and
    one it runs while another value still waits in its file (a reload drops that)."""
    behind = []
    for row, same in _requested_rows(requested, rows):
        if same:
            if row.pending_restart:
                behind.append(row.name)
        elif row.context != "postmaster" or not (row.pending_restart or ha_pending):
            behind.append(row.name)
    return behind


def not_yet_in_effect(requested: Mapping[str, str], rows: Mapping[str, SettingRow], *, ha_pending: bool) -> list[str]:
    """What keeps a member from counting as done: a requested parameter it does not run or
    marks pending_restart, and, where a requested parameter needs a restart, the HA manager's
    own pending-restart flag."""
    behind = []
    restart = False
    for row, same in _requested_rows(requested, rows):
        restart |= row.context == "postmaster"
        if not same:
            behind.append(f"{row.name} is {show(row)}")
        elif row.pending_restart:
            behind.append(f"{row.name} pending a restart")
    if restart and ha_pending:
        behind.append("the HA manager reports a restart pending")
    return behind


def ownership_refusals(requested: Mapping[str, str], rows: Mapping[str, SettingRow],
                       managed: Mapping[str, str | None], inventory: Mapping[str, str]) -> list[str]:
    """Parameters the building block sets itself (the HA driver's `managed_parameters`), asked
    for with another value: the next build_cluster, or the HA manager at once, would put its own
    back. `inventory` is cluster.postgres.parameters: a parameter the inventory sets may be rolled
    out with the inventory's value (edit the inventory, then change_settings with that value)."""
    by_name = _lookup(rows)
    inventory_by_name = {_fold(k): (k, v) for k, v in inventory.items()}
    refusals = []
    for name, value in requested.items():
        folded = _fold(name)
        if folded not in managed:
            continue
        if managed[folded] is None:
            refusals.append(f"parameters.{name}: set by the HA manager itself on every start; it cannot be "
                            "changed here")
            continue
        row = by_name.get(folded)
        if row is None or _equal_values(row, value, str(managed[folded])):
            continue
        if folded in inventory_by_name:
            key, pinned = inventory_by_name[folded]
            refusals.append(f"parameters.{name}: the inventory sets it to {pinned!r} "
                            f"(cluster.postgres.parameters.{key}) and build_cluster would put that back; change "
                            "the inventory first, then run change_settings with the same value")
        else:
            refusals.append(f"parameters.{name}: bouwsteen sets it to {managed[folded]!r} for replication, "
                            "archiving or TLS; set it in cluster.postgres.parameters if it must differ")
    return refusals


def _equal_values(row: SettingRow, a: str, b: str) -> bool:
    try:
        return _same(replace(row, setting=b), _parsed(a, row)) if row.vartype != "string" else a == b
    except _Refused:
        return False


def needs_restart(changes: Sequence[SettingChange]) -> bool:
    return any(c.needs == "restart" for c in changes)


# --- rolling restart ------------------------------------------------------------------------------

class RestartStep(NamedTuple):
    """("restart", host) or ("switchover", the standby that becomes primary)."""

    action: Literal["restart", "switchover"]
    host: str


def _lag(m: Member) -> float:
    return float("inf") if m.lag_bytes is None else float(m.lag_bytes)


def restart_order(view: ClusterView, caught_up: Mapping[str, bool]) -> list[RestartStep]:
    """The rolling restart: every standby, one at a time, least useful first, so a value that
    keeps PostgreSQL from starting costs the member the cluster misses least; then a switchover
    to the best caught-up standby (restarted last, so the new primary runs the new values); then
    the old primary, as a standby. Nobody is without a primary longer than a switchover.

    `caught_up` has an entry for each standby that streams from the primary (pg_stat_replication
    there), True when its lag is within the runbook's limit. A standby without an entry does not
    stream: it is refused, not restarted (re-clone or remove it first). With standbys recorded
    synchronous only those may be switched over to: the HA manager promotes no other in
    synchronous mode. The runbook waits for each restarted standby to stream again before the
    next step, and checks the target is still caught up just before switching over."""
    primary = view.leader
    if primary is None:
        raise SettingsPlanError("the cluster has no primary; a rolling restart starts from a healthy cluster")
    standbys = [m for m in view.members if m.name != primary]
    refusals = []
    for m in standbys:
        if m.role == "primary":
            refusals.append(f"{m.name} reports itself primary beside {primary}")
        elif m.name not in caught_up:
            refusals.append(f"{m.name} does not stream from {primary}: it is not restarted; re-clone it "
                            f"(reinit_standby) or remove it first")
        elif not m.healthy:
            refusals.append(f"the HA manager counts {m.name} unhealthy; it is not restarted")
    if refusals:
        raise SettingsPlanError(*refusals)
    ready = [m for m in standbys if caught_up[m.name]]
    synchronous = any(m.synchronous for m in standbys)
    candidates = [m for m in ready if m.synchronous] if synchronous else ready
    if not candidates:
        kind = "caught-up synchronous standby" if synchronous else "caught-up standby"
        raise SettingsPlanError(f"no {kind} to switch over to: restarting {primary} would leave the cluster "
                                "without a primary")
    target = min(candidates, key=lambda m: (_lag(m), m.name))
    order = sorted(standbys, key=lambda m: (m.name == target.name, caught_up[m.name], m.synchronous,
                                            -_lag(m), m.name))
    return ([RestartStep("restart", m.name) for m in order]
            + [RestartStep("switchover", target.name), RestartStep("restart", primary)])


# --- the plan artifact ----------------------------------------------------------------------------

def _shown(text: str) -> str:
    return text if text else "''"


def settings_plan(changes: Sequence[SettingChange], order: Sequence[RestartStep] = ()) -> ActionPlan:
    """The plan change_settings publishes: the configuration written through the HA manager
    (every member reloads), then, when a change needs it, the rolling restart `order`."""
    todo = [c for c in changes if c.needs != "nothing"]
    if not todo:
        return ActionPlan(nothing_to_do="Every parameter already has the requested value: nothing to change.")
    restart = needs_restart(todo)
    if restart and not order:
        raise ValueError("a change needs a restart: pass restart_order(view, caught_up)")
    refusals = tuple(
        f"parameters.{c.name}: lowering it ({c.old} → {c.new}) needs the primary restarted before its standbys, "
        "which must run with at least the primary's value; this rolling restart goes standbys first"
        for c in todo if c.needs == "restart" and c.lowered and c.name in _STANDBY_FLOOR)
    if refusals:
        return ActionPlan(refusals=refusals)
    actions = [Action("cluster", f"set {', '.join(c.name for c in todo)} in the HA manager's configuration; "
                                 "every member reloads")]
    if restart:
        steps = list(order)
        switch = next((i for i, s in enumerate(steps) if s.action == "switchover"), len(steps))
        old_primary = steps[switch + 1].host if switch + 1 < len(steps) else "the primary"
        for i, step in enumerate(steps):
            if step.action == "switchover":
                actions.append(Action(step.host, f"switchover from {old_primary}: becomes the primary"))
            elif i > switch:
                # Demoted, the HA manager starts it again as a standby, with the new values.
                actions.append(Action(step.host, "the former primary, restarted by its demotion: restart it "
                                                 "through the HA manager only if it still runs an old value"))
            else:
                actions.append(Action(step.host, "restart PostgreSQL through the HA manager (standby); "
                                                 "wait until it streams again"))
    notes = [f"{c.name}: {_shown(c.old)} → {_shown(c.new)} ({c.needs})" for c in todo]
    notes += [f"{c.name}: the configuration held another value waiting for a restart; writing {c.new} back "
              "drops it" for c in todo if c.clears_pending]
    fresh = [c.name for c in todo if c.context in ("backend", "superuser-backend")]
    if fresh:
        notes.append(f"{', '.join(fresh)}: sessions started after the reload get the new value; open sessions "
                     "keep theirs.")
    overridable = [c.name for c in todo if c.context in ("user", "superuser")]
    if overridable:
        notes.append(f"{', '.join(overridable)}: a value set for a role, a database or in a session still wins "
                     "over this one.")
    unchanged = [c.name for c in changes if c.needs == "nothing"]
    if unchanged:
        notes.append(f"Already set: {', '.join(unchanged)}.")
    return ActionPlan(tuple(actions), notes=tuple(notes))
