"""Every error bouwsteen raises on purpose derives from `BouwsteenError`.

A caller (the CLI, a ticket client, an automation, a test) can then tell the project's own
refusals and failures from a bug in it or in a library. Adapter errors (SSH, PostgreSQL, etcd, S3,
drivers, inventory) live beside their adapters and derive from the root too; the errors a runbook
itself ends with live here. No Prefect, no I/O: adapters and the programs' pure parts import it.
"""

from __future__ import annotations


class BouwsteenError(Exception):
    """The root of the project's own errors."""


class PreflightRefused(BouwsteenError):
    """Pre-flight (or input checking) found a reason not to act, before anything changed.

    The class owns the wording: one reason follows on the line, several go one per line.
    `nothing` says what did not happen ("changed" for runbooks, "ran" for jobs)."""

    def __init__(self, *reasons: str, nothing: str = "changed"):
        self.reasons = tuple(str(r) for r in reasons)
        self.nothing = nothing
        head = f"refused, nothing {nothing}:"
        if len(self.reasons) == 1:
            text = f"{head} {self.reasons[0]}"
        else:
            text = "\n".join((head, *self.reasons))
        super().__init__(text)

    def __reduce__(self):
        # Prefect persists a failed run's exception; unpickling must not wrap the wording twice.
        return (_refusal, (type(self), self.reasons, self.nothing))


def _refusal(cls: type[PreflightRefused], reasons: tuple[str, ...], nothing: str) -> PreflightRefused:
    return cls(*reasons, nothing=nothing)


class NoPrimary(BouwsteenError):
    """The HA manager names no primary right now (a failover may be under way)."""


class NotYet(BouwsteenError):
    """A wait's probe saw the state it waits for not reached yet; `wait_for` polls again."""


class DeadlineExceeded(BouwsteenError):
    """A wait's deadline passed before its state was reached."""


class ClusterBusy(BouwsteenError):
    """Another runbook holds the cluster's lock."""


class LockUnavailable(BouwsteenError):
    """The cluster's etcd lock cannot be taken because etcd does not answer: the runbook refuses
    before anything changed rather than go on with the Prefect lock alone (which does not exclude
    anything that bypasses Prefect). Not "busy": no other holder was seen; etcd needs looking at."""


class LockLost(BouwsteenError):
    """A lock held for a runbook (the cluster's etcd lock, a TAB job's pgquartz lock) was lost
    while held: its lease expired or could not be renewed within its TTL, or its key is no longer
    ours. The holder stops before its next change and the run fails; never retried, because
    another holder may be acting by now.

    `lock` names the lock (and its etcd key), `lost_at` says when (UTC, ISO 8601), `reason` why."""

    def __init__(self, lock: str, lost_at: str, reason: str):
        self.lock = lock
        self.lost_at = lost_at
        self.reason = reason
        super().__init__(f"lost {lock} at {lost_at}: {reason}; stopped before the next change (another "
                         "holder may be acting now: look at what ran before running again)")

    def __reduce__(self):
        return (type(self), (self.lock, self.lost_at, self.reason))


class BackupFailed(BouwsteenError):
    """The base backup did not complete or did not verify."""


class BackupTooOld(BouwsteenError):
    """The newest good backup is older than the freshness limit: the nightly alarm."""


class DrillFailed(BouwsteenError):
    """The restore drill's copy did not restore, recover or verify."""


class JobFailed(BouwsteenError):
    """A TAB (pgquartz) job's step or check failed."""


class VerifyFailed(BouwsteenError):
    """A runbook acted, and its verify step found the outcome not as planned."""


class UpgradeStopped(BouwsteenError):
    """A host of a rolling upgrade failed: the run stopped there, the cluster serving, the host named."""


class ServiceDidNotStart(BouwsteenError):
    """A controller-side service (the Prefect server or a worker) did not come up."""
