"""One runbook at a time per cluster: a Prefect global concurrency limit paired with an etcd lock.

The Prefect limit (strict: a missing limit is an error, not "no lock") serialises runs that go
through the Prefect server. The etcd lease lock also excludes anything that bypasses Prefect
(a cron job, a DBA's script) and frees itself within the lease TTL when a holder dies.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from tasks.adapters import etcd_config
from tasks.adapters.etcd import Etcd, EtcdUnavailable, LockTimeout
from tasks.context import context_for
from tasks.errors import ClusterBusy, JobFailed
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


@contextlib.contextmanager
def cluster_lock(cluster: str, runbook: str, *, wait_seconds: float = 0, require_etcd: bool = False) -> Iterator[None]:
    """Hold the cluster for `runbook`; refuse (ClusterBusy) if it stays taken for `wait_seconds`."""
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
            ctx = context_for(cluster)
            etcd = Etcd(etcd_config.client_endpoints(ctx.inventory), timeout=3)
            holder = f"{runbook} on {socket.gethostname()} pid {os.getpid()}"
            mutex = etcd.mutex(etcd_lock_prefix(cluster), ttl=LEASE_TTL, holder=holder)
            try:
                mutex.acquire(timeout=max(wait_seconds, 1))
            except EtcdUnavailable:
                if require_etcd:
                    raise
                logger.warning("etcd does not answer yet; holding only the Prefect lock for cluster %s.", cluster)
                mutex = None
            except LockTimeout as exc:
                raise ClusterBusy(f"cluster {cluster} is busy: {exc}") from None
            try:
                logger.info("Holding the lock on cluster %s for %s.", cluster, runbook)
                yield
            finally:
                if mutex is not None:
                    mutex.release()
    except TimeoutError:
        if holding_slot:
            raise  # the runbook's own timeout (a step's), not a busy cluster
        raise ClusterBusy(
            f"cluster {cluster} is busy: another runbook holds Prefect limit {limit_name(cluster)}"
        ) from None


@contextlib.contextmanager
def pgquartz_lock(cluster: str, job: Job, holder: str) -> Iterator[None]:
    """A TAB job's own lock: pgquartz's etcd mutex under the job's lock prefix, the one a cron-run
    pgquartz takes, so the two never run the same job at once. Waits the job's lockTimeout.

    The etcd is the job's own `etcdConfig.endpoints` when the job file sets them (a loopback one,
    pgquartz's `localhost:2379`, is the node's own member: the cluster's members at that port),
    else the cluster's etcd."""
    ctx = context_for(cluster)
    etcd = Etcd(job.etcd_config.lock_endpoints(etcd_config.client_endpoints(ctx.inventory)), timeout=3)
    mutex = etcd.mutex(job.lock_prefix, ttl=PGQUARTZ_LEASE_TTL,
                       holder=f"{holder} on {socket.gethostname()} pid {os.getpid()}")
    try:
        mutex.acquire(timeout=job.etcd_config.lock_timeout)
    except LockTimeout as exc:
        raise JobFailed(f"job {job.name}: {exc}") from None
    try:
        yield
    finally:
        mutex.release()
