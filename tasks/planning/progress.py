"""Pure wording of a long backup's or restore's progress: how far, and the time left at the rate so far."""

from __future__ import annotations


def progress_line(what: str, done: int, total: int, elapsed_s: float) -> tuple[float, str]:
    """(percent for the progress bar, one line: bytes done of all, and the estimate of the time
    left at the average rate since the start; none until there is a rate)."""
    if total <= 0:
        return 0.0, f"{what}: {done / 2**20:.0f} MiB done, size unknown"
    done = max(0, min(done, total))
    percent = round(100.0 * done / total, 1)
    line = f"{what}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB ({percent:.0f} %)"
    if 0 < done < total and elapsed_s > 0:
        left = (total - done) / (done / elapsed_s)
        line += f", about {_duration(left)} left"
    return percent, line


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
