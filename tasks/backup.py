"""Runbook steps for the backup server, base backups and restore drills."""

from __future__ import annotations

from tasks.adapters.objectstore_server import server_for
from tasks.adapters.s3 import ObjectStore, ObjectStoreError, ObjectStoreUnavailable, S3Endpoint
from tasks.cluster import wait_for
from tasks.context import ClusterContext, context_for
from tasks.runtime import say, step


def store_endpoint(ctx: ClusterContext, *, admin: bool = False) -> S3Endpoint:
    store = ctx.inventory.cluster.object_store
    block = ctx.store_block
    if store is None or block is None:
        raise LookupError(f"cluster {ctx.name} has no object store configured")
    host = ctx.inventory.host(store.host)
    # The controller reaches the store by address; the certificate carries it as an IP SAN.
    return S3Endpoint(
        url=f"https://{host.address}:{store.endpoint_port}",
        access_key_id=block.admin_access_key_id if admin else block.access_key_id,
        secret_access_key=(block.admin_secret_access_key if admin else block.secret_access_key).get_secret_value(),
        ca_pem=block.ca_certificate,
        region=store.region,
    )


def cluster_prefix(ctx: ClusterContext) -> str:
    return f"{ctx.name}/"


@step
def ensure_object_store_prepared(cluster: str) -> str:
    """Service account and data directory (the path the site's file-level backup picks up)."""
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    with ctx.remote(store.host) as remote:
        for command in server_for(store.server).prepare_commands(ctx.inventory):
            remote.run(command)
    return say(f"{store.host}: service account and {store.data_path} in place.")


@step(retries=0)
def wait_until_object_store_answers(cluster: str, timeout: float = 60) -> str:
    ctx = context_for(cluster)

    def answers() -> bool:
        with ObjectStore(store_endpoint(ctx, admin=True), timeout=3) as s3:
            s3.client.list_buckets()
            return True

    wait_for("object store answering over TLS", lambda: _swallow(answers), timeout=timeout)
    return say("The object store answers over TLS with a certificate from the site CA.")


def _swallow(fn):
    try:
        return fn()
    except (ObjectStoreUnavailable, ObjectStoreError, Exception) as exc:  # noqa: BLE001 - polled until deadline
        from tasks.cluster import NotYet

        raise NotYet(str(exc)[:200]) from None


@step
def ensure_bucket_and_prefix(cluster: str) -> list[str]:
    """The bucket (admin key) and the cluster's prefix (with the cluster's own key, proving it works)."""
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    created = []
    with ObjectStore(store_endpoint(ctx, admin=True)) as admin:
        if admin.ensure_bucket(store.bucket):
            created.append(f"bucket {store.bucket}")
    with ObjectStore(store_endpoint(ctx)) as own:
        marker = f"{cluster_prefix(ctx)}.bouwsteen-prefix"
        if not own.exists(store.bucket, marker):
            own.put(store.bucket, marker, f"prefix of cluster {cluster}\n".encode())
            created.append(f"prefix {cluster_prefix(ctx)}")
    say(f"Created {', '.join(created)}." if created else f"Bucket {store.bucket} and prefix {cluster_prefix(ctx)} already exist.")
    return created


@step
def is_object_store_working(cluster: str) -> float:
    ctx = context_for(cluster)
    store = ctx.inventory.cluster.object_store
    assert store is not None
    with ObjectStore(store_endpoint(ctx)) as own:
        seconds = own.round_trip(store.bucket, cluster_prefix(ctx))
    say(f"Put, get and delete of a test object under {cluster_prefix(ctx)} worked in {seconds:.2f}s.")
    return seconds
