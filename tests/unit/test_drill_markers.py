"""tasks/planning/backup.py compare_markers: the restored copy's marker rows against the source's.

Rows are [id, written_at] as psql prints `id::text, written_at::text` (timestamptz, PostgreSQL's
text form: a space, trailing zeros of the fraction dropped, "+00" style offsets). "latest" drills
write a marker just before the backup is fetched; point-in-time drills pass the target instead.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tasks.errors import DrillFailed
from tasks.planning.backup import compare_markers
from tasks.restore import Marker


def row(marker_id: int, written_at: str) -> list[str]:
    return [str(marker_id), written_at]


SOURCE = [
    row(1, "2026-11-27 10:00:00.123456+00"),
    row(2, "2026-11-27 10:10:00+00"),
    row(3, "2026-11-27 10:20:00.5+00"),
    row(4, "2026-11-27 10:30:00.25+00"),  # the drill's own marker in the "latest" cases
    row(5, "2026-11-27 10:40:00+00"),  # written after the marker, before the source was read
]
MARKER = Marker(4, "2026-11-27 10:30:00.25+00")


def up_to(n: int) -> list[list[str]]:
    return [r for r in SOURCE if int(r[0]) <= n]


def without(*ids: int) -> list[list[str]]:
    return [r for r in SOURCE if int(r[0]) not in ids]


# --------------------------------------------------------------------------- "latest": up to the marker

LATEST = {
    "everything up to the marker": (SOURCE, up_to(4), MARKER, "4 marker row(s)"),
    "everything": (SOURCE, SOURCE, MARKER, "5 marker row(s)"),
    # Rows after the marker were written after the backup's WAL was cut: not required.
    "a row after the marker is missing": (SOURCE, without(5), MARKER, "4 marker row(s)"),
    "the marker is missing": (SOURCE, up_to(3), MARKER,
                              DrillFailed("marker 4 written before the drill is missing: recovery stopped early")),
    "the marker is missing, with the rest": (SOURCE, without(4), MARKER, DrillFailed("marker 4 written before")),
    "an older row is missing": (SOURCE, without(3, 5), MARKER,
                                DrillFailed("markers ['3'] exist on the source before the target but not in the "
                                            "restored copy")),
    "several older rows are missing": (SOURCE, [SOURCE[3]], MARKER, DrillFailed("markers ['1', '2', '3'] exist")),
    # Ids compare as numbers: as text, "9" would sort after the marker "10" and not be required.
    "ids compare as numbers": ([row(9, "2026-11-27 09:00:00+00"), row(10, "2026-11-27 10:00:00+00")],
                               [row(10, "2026-11-27 10:00:00+00")], Marker(10, "2026-11-27 10:00:00+00"), DrillFailed("markers ['9'] exist")),
    "no marker: every source row": (up_to(3), without(2, 4, 5), None, DrillFailed("markers ['2'] exist")),
    "no marker, all there": (up_to(3), up_to(3), None, "3 marker row(s)"),
    "nothing on either side": ([], [], None, "0 marker row(s)"),
    # A restored row the source does not have: writes the source lost (another timeline).
    "an extra restored row is refused": (SOURCE, up_to(4) + [row(99, "2026-11-27 10:35:00+00")], MARKER,
                                         DrillFailed("markers ['99'] in the restored copy are not the source's")),
    "a row written at another time is refused": (SOURCE, up_to(3) + [row(4, "2026-11-27 10:31:00+00")], MARKER,
                                                 DrillFailed("markers ['4'] in the restored copy are not the source's")),
}


@pytest.mark.parametrize(("source", "restored", "marker", "outcome"), LATEST.values(), ids=LATEST.keys())
def test_latest(source: list[list[str]], restored: list[list[str]], marker: Marker | None,
                outcome: str | DrillFailed) -> None:
    check(source, restored, None, marker, outcome)


# --------------------------------------------------------------------------- point in time: up to the target

T = datetime.fromisoformat("2026-11-27T10:25:00+00:00")
AT_3 = datetime.fromisoformat("2026-11-27T10:20:00.5+00:00")  # exactly row 3's written_at
SAME_AS_T = datetime.fromisoformat("2026-11-27T11:25:00+01:00")

POINT_IN_TIME = {
    "everything before the target": (up_to(3), T, "3 marker row(s)"),
    "a row after the target is present": (up_to(4), T,
                                          DrillFailed("markers written after the target 2026-11-27T10:25:00+00:00 "
                                                      "are present: ['4']")),
    "rows after the target are present": (SOURCE, T, DrillFailed("are present: ['4', '5']")),
    "a row before the target is missing": (without(2, 4, 5), T,
                                           DrillFailed("markers ['2'] exist on the source before the target but not "
                                                       "in the restored copy")),
    # A row also after the target counts first: it is the clearer sign of a wrong recovery target.
    "both after and missing": (without(2), T, DrillFailed("markers written after the target")),
    "a row written at the target belongs before it": (up_to(3), AT_3, "3 marker row(s)"),
    "a row written at the target is missing": (up_to(2), AT_3, DrillFailed("markers ['3'] exist")),
    "nothing before the target": ([], datetime.fromisoformat("2026-11-27T09:00:00+00:00"), "0 marker row(s)"),
    "the target in another zone": (up_to(3), SAME_AS_T, "3 marker row(s)"),
    "the target in another zone, a row after it": (up_to(4), SAME_AS_T, DrillFailed("are present: ['4']")),
    # Rows compare as moments, not as text: 11:30+01 is after 10:25Z, 09:50-01 (10:50Z) too.
    "a row printed in another zone, after the target": (up_to(3) + [row(4, "2026-11-27 11:30:00+01")], T,
                                                        DrillFailed("are present: ['4']")),
    "a row printed behind UTC, after the target": (up_to(3) + [row(4, "2026-11-27 09:50:00-01")], T,
                                                   DrillFailed("are present: ['4']")),
    "a row printed ahead of UTC, before the target": (up_to(2) + [row(3, "2026-11-27 12:20:00.5+02")], T,
                                                      "3 marker row(s)"),
}


@pytest.mark.parametrize(("restored", "target", "outcome"), POINT_IN_TIME.values(), ids=POINT_IN_TIME.keys())
def test_point_in_time(restored: list[list[str]], target: datetime, outcome: str | DrillFailed) -> None:
    check(SOURCE, restored, target, None, outcome)


def check(source: list[list[str]], restored: list[list[str]], target: datetime | None, marker: Marker | None,
          outcome: str | DrillFailed) -> None:
    if isinstance(outcome, DrillFailed):
        with pytest.raises(DrillFailed) as raised:
            compare_markers(source, restored, target, marker)
        assert str(outcome) in str(raised.value)
    else:
        assert compare_markers(source, restored, target, marker) == (
            f"{outcome} match the source up to the target")
