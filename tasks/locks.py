"""One runbook at a time per cluster: a Prefect global concurrency limit paired with an etcd lock.

The Prefect limit (strict: a missing limit is an error, not "no lock") serialises runs that go
through the Prefect server. The etcd lease lock also excludes anything that bypasses Prefect
(a cron job, a DBA's script) and frees itself within the lease TTL when a holder dies. Both are
needed: an etcd that does not answer is a refusal (LockUnavailable), except while a build brings
etcd up (EtcdPolicy "once_up").

A held etcd lock (the cluster's, a TAB job's pgquartz lock) notices its loss: the mutex's
keep-alive confirms lease and key every ttl/3 (tasks/adapters/etcd.py), the lock is registered
for its cluster's steps (tasks/lockwatch.py), and the next changing step raises LockLost.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator, Literal

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from tasks.adapters import etcd_config
from tasks.adapters.etcd import EtcdMutex, EtcdUnavailable, LockTimeout
from tasks.context import context_for
from tasks.errors import ClusterBusy, JobFailed, LockLost, LockUnavailable
from tasks.lockwatch import Watched, watching
from tasks.pgquartz import Job

LEASE_TTL = 30
# pgquartz's etcd session uses the client's default TTL: a crashed holder frees the lock after it.
PGQUARTZ_LEASE_TTL = 60


def limit_name(cluster: str) -> str:
    return f"cluster-{cluster}"


def ensure_cluster_limit(cluster: str) -> None:
    name = limit_name(cluster)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def limit_in_use(cluster: str) -> bool:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name(cluster))
    return limit.active_slots >= limit.limit


def etcd_lock_prefix(cluster: str) -> str:
    inv = context_for(cluster).inventory
    return f"{inv.cluster.etcd.prefix}/locks/{cluster}/"


# How the cluster lock treats an etcd that does not answer when it is taken: "required" refuses
# (LockUnavailable); "once_up" holds the Prefect lock alone until the runbook has brought etcd up
# and calls `take_etcd_lock()` (build_cluster: the lock lives in the etcd it is building).
# "if_up" takes the etcd lock when etcd answers and goes on without it otherwise: for a runbook
# that only changes hosts outside the cluster's etcd (the backup server), which a site sets up
# before its first build_cluster.
EtcdPolicy = Literal["required", "once_up", "if_up"]


class ClusterHold:
    """What `cluster_lock` holds for a runbook: the Prefect slot, and the etcd mutex (with policy
    "once_up", from `take_etcd_lock()` on when etcd did not answer at first). Registered for the
    cluster's steps to check (`tasks/lockwatch.py`): `require()` raises LockLost once the etcd
    lock is lost."""

    def __init__(self, cluster: str, runbook: str, *, wait_seconds: float) -> None:
        self.cluster = cluster
        self.runbook = runbook
        self.wait_seconds = wait_seconds
        self.mutex: EtcdMutex | None = None

    @property
    def name(self) -> str:
        if self.mutex is None:
            return f"the cluster lock of {self.cluster} (Prefect limit only, until etcd is up)"
        return self.mutex.name

    def require(self) -> None:
        if self.mutex is not None:
            self.mutex.require()

    def take_etcd_lock(self) -> None:
        """With policy "once_up": take the etcd lock now that etcd is up (no-op when held). etcd
        still not answering is LockUnavailable, another holder past the wait ClusterBusy."""
        if self.mutex is None:
            self.mutex = self._acquire(refusing=False)
            get_run_logger().info("etcd is up: holding the etcd lock on cluster %s for %s from here on.",
                                  self.cluster, self.runbook)

    def _acquire(self, *, refusing: bool) -> EtcdMutex:
        ctx = context_for(self.cluster)
        etcd = ctx.etcd()
        holder = f"{self.runbook} on {socket.gethostname()} pid {os.getpid()}"
        mutex = etcd.mutex(etcd_lock_prefix(self.cluster), ttl=LEASE_TTL, holder=holder,
                           label=f"the cluster lock of {self.cluster}")
        try:
            mutex.acquire(timeout=max(self.wait_seconds, 1))
        except EtcdUnavailable as exc:
            if refusing:
                raise LockUnavailable(
                    f"cluster {self.cluster}: refused, nothing changed: its etcd lock cannot be taken ({exc}). "
                    "The Prefect lock alone does not exclude runs that bypass Prefect, and a cluster whose etcd "
                    "does not answer is not one to change: look at etcd (check_hosts, etcdctl endpoint health), "
                    "then run again") from None
            raise LockUnavailable(f"cluster {self.cluster}: etcd is up but its lock cannot be taken ({exc}); "
                                  f"{self.runbook} stopped before changing more") from None
        except LockTimeout as exc:
            raise ClusterBusy(f"cluster {self.cluster} is busy: {exc}") from None
        return mutex

    def release(self) -> None:
        if self.mutex is not None:
            self.mutex.release()


@contextlib.contextmanager
def cluster_lock(cluster: str, runbook: str, *, wait_seconds: float = 0,
                 etcd: EtcdPolicy = "required") -> Iterator[ClusterHold]:
    """Hold the cluster for `runbook`; refuse (ClusterBusy) if it stays taken for `wait_seconds`,
    and (LockUnavailable) if etcd does not answer, unless `etcd="once_up"` (see EtcdPolicy).
    Losing the etcd lock while held fails the next changing step with LockLost, and the `with`
    itself at its end if no step noticed."""
    logger = get_run_logger()
    ensure_cluster_limit(cluster)
    if wait_seconds <= 0 and limit_in_use(cluster):
        raise ClusterBusy(f"cluster {cluster} is busy: another runbook holds Prefect limit {limit_name(cluster)}")
    holding_slot = False
    try:
        # The timeout also covers the HTTP round trips of acquiring, so it is never tiny.
        with concurrency(limit_name(cluster), occupy=1, strict=True, timeout_seconds=max(wait_seconds, 30),
                         lease_duration=60):
            holding_slot = True
            hold = ClusterHold(cluster, runbook, wait_seconds=wait_seconds)
            try:
                hold.mutex = hold._acquire(refusing=True)
            except LockUnavailable:
                if etcd == "required":
                    raise
                if etcd == "once_up":
                    logger.warning("etcd does not answer yet; holding only the Prefect lock for cluster %s until %s "
                                   "has brought etcd up (its policy: the etcd lock once etcd is up).", cluster, runbook)
                else:
                    logger.warning("etcd does not answer; holding only the Prefect lock for cluster %s: %s changes no "
                                   "host of the cluster's etcd (its policy: the etcd lock when etcd answers).",
                                   cluster, runbook)
            try:
                logger.info("Holding the lock on cluster %s for %s.", cluster, runbook)
                with _loud_on_loss(cluster, hold):
                    yield hold
            finally:
                hold.release()
    except TimeoutError:
        if holding_slot:
            raise  # the runbook's own timeout (a step's), not a busy cluster
        raise ClusterBusy(
            f"cluster {cluster} is busy: another runbook holds Prefect limit {limit_name(cluster)}"
        ) from None


@contextlib.contextmanager
def _loud_on_loss(cluster: str, lock: Watched) -> Iterator[None]:
    """Steps of `cluster` check `lock` inside the `with`; a loss no step noticed fails it at the
    end, and a body that failed some other way while the lock was lost fails with LockLost (its
    own error as the cause)."""
    with watching(cluster, lock):
        try:
            yield
        except LockLost:
            raise
        except Exception as exc:
            try:
                lock.require()
            except LockLost as lost:
                raise lost from exc
            raise
        lock.require()


@contextlib.contextmanager
def pgquartz_lock(cluster: str, job: Job, holder: str) -> Iterator[None]:
    """A TAB job's own lock: pgquartz's etcd mutex under the job's lock prefix, the one a cron-run
    pgquartz takes, so the two never run the same job at once. Waits the job's lockTimeout.
    Losing it fails the next step instance with LockLost (each checks before it starts), and the
    `with` at its end if none noticed.

    The etcd is the job's own `etcdConfig.endpoints` when the job file sets them (a loopback one,
    pgquartz's `localhost:2379`, is the node's own member: the cluster's members at that port),
    else the cluster's etcd."""
    ctx = context_for(cluster)
    etcd = ctx.etcd(job.etcd_config.lock_endpoints(etcd_config.client_endpoints(ctx.inventory)))
    mutex = etcd.mutex(job.lock_prefix, ttl=PGQUARTZ_LEASE_TTL,
                       holder=f"{holder} on {socket.gethostname()} pid {os.getpid()}",
                       label=f"the pgquartz lock of job {job.name}")
    try:
        mutex.acquire(timeout=job.etcd_config.lock_timeout)
    except LockTimeout as exc:
        raise JobFailed(f"job {job.name}: {exc}") from None
    try:
        with _loud_on_loss(cluster, mutex):
            yield
    finally:
        mutex.release()
