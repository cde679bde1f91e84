"""lab/avprobe.py: the pure ProbeReport/Attempt arithmetic (no database)."""

from __future__ import annotations

import pytest

from lab.avprobe import Attempt, ProbeReport

# Binary-exact numbers (1/8 s, 1/64 s), so equal gaps are exactly equal at epoch magnitudes.
T0 = 1_700_000_000.0
INTERVAL = 0.125
LATENCY = 0.015625
EPS = 1e-6


def report(pattern: str, *, interval: float = INTERVAL, latency: float = LATENCY) -> ProbeReport:
    """'.' = acknowledged, 'x' = failed; attempt i is sent at T0 + i * interval."""
    attempts = [
        Attempt(seq=i + 1, sent=T0 + i * interval, latency=latency if c == "." else None,
                error="" if c == "." else "connection refused")
        for i, c in enumerate(pattern)
    ]
    return ProbeReport(run_id="r1", attempts=attempts)


def ack(i: int, *, interval: float = INTERVAL, latency: float = LATENCY) -> float:
    return T0 + i * interval + latency


def sent(i: int, *, interval: float = INTERVAL) -> float:
    return T0 + i * interval


@pytest.mark.parametrize(
    ("pattern", "acknowledged", "failures"),
    [
        ("", 0, 0),
        (".", 1, 0),
        ("x", 0, 1),
        ("..........", 10, 0),
        ("...xxx....", 7, 3),
        ("x.x.x", 2, 3),
        ("xxxx", 0, 4),
    ],
)
def test_counts(pattern: str, acknowledged: int, failures: int) -> None:
    r = report(pattern)
    assert len(r.acknowledged) == acknowledged
    assert r.failures == failures
    assert [a.seq for a in r.acknowledged] == [i + 1 for i, c in enumerate(pattern) if c == "."]


@pytest.mark.parametrize(
    ("pattern", "window"),
    [
        pytest.param("..........", (ack(0), ack(1)), id="no-failures"),
        pytest.param("...xxx....", (ack(2), ack(6)), id="failures-in-the-middle"),
        pytest.param("..x.......", (ack(1), ack(3)), id="one-failure"),
        pytest.param("......xxxx", (ack(5), sent(9)), id="failures-at-the-end"),
        pytest.param("xxx.......", (sent(0), ack(3)), id="failures-at-the-start"),
        pytest.param(".x..xxx...", (ack(3), ack(7)), id="longest-of-two-outages"),
        pytest.param("xxxx", (sent(0), sent(3)), id="no-acknowledgement"),
    ],
)
def test_longest_gap_and_window(pattern: str, window: tuple[float, float]) -> None:
    r = report(pattern)
    assert r.gap_window() == pytest.approx(window, abs=EPS)
    assert r.longest_gap() == pytest.approx(window[1] - window[0], abs=EPS)


@pytest.mark.parametrize(
    ("pattern", "gap"),
    [
        ("..........", INTERVAL),
        ("...xxx....", 4 * INTERVAL),
        ("..x.......", 2 * INTERVAL),
        (".x..xxx...", 4 * INTERVAL),
        ("......xxxx", 4 * INTERVAL - LATENCY),
    ],
)
def test_longest_gap_values(pattern: str, gap: float) -> None:
    assert report(pattern).longest_gap() == pytest.approx(gap, abs=EPS)


def test_no_failures_gap_is_about_the_interval_even_with_varying_latency() -> None:
    latencies = [0.004, 0.02, 0.011, 0.009, 0.015]
    r = ProbeReport("r", [Attempt(i + 1, T0 + i * INTERVAL, lat) for i, lat in enumerate(latencies)])
    # Between consecutive commits: interval + latency difference; the largest is interval + (0.02 - 0.004).
    assert r.longest_gap() == pytest.approx(INTERVAL + 0.016, abs=EPS)
    assert r.gap_window() == pytest.approx((T0 + 0.004, T0 + INTERVAL + 0.02), abs=EPS)


def test_single_acknowledged_attempt() -> None:
    r = report(".")
    assert r.longest_gap() == pytest.approx(LATENCY, abs=EPS)
    assert r.gap_window() == pytest.approx((T0, T0 + LATENCY), abs=EPS)


def test_empty_report() -> None:
    r = ProbeReport("r")
    assert r.longest_gap() == 0.0
    assert r.gap_window() == (0.0, 0.0)
    assert r.failures == 0
    assert r.acknowledged == []


def test_zero_latency_ack_counts_as_acknowledged() -> None:
    r = ProbeReport("r", [Attempt(1, T0, 0.0), Attempt(2, T0 + 1, None), Attempt(3, T0 + 2, 0.0)])
    assert len(r.acknowledged) == 2
    assert r.failures == 1
    assert r.longest_gap() == pytest.approx(2.0)


def test_gap_window_matches_longest_gap_on_irregular_timing() -> None:
    sends = [0.0, 0.1, 0.2, 1.7, 1.8, 3.9, 4.0]
    latencies: list[float | None] = [0.01, 0.01, None, 0.3, 0.01, None, 0.02]
    r = ProbeReport("r", [Attempt(i + 1, T0 + s, lat) for i, (s, lat) in enumerate(zip(sends, latencies))])
    start, end = r.gap_window()
    assert end - start == pytest.approx(r.longest_gap(), abs=EPS)
    # Ack of attempt 5 (1.81) to ack of attempt 7 (4.02).
    assert (start - T0, end - T0) == pytest.approx((1.81, 4.02), abs=EPS)
