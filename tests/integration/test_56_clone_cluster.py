"""clone_cluster (issue 17): the lab cluster's backup restored into `acc`, a cluster of its own
(acc1-acc3 with their own etcd, credentials and bucket prefix; the backup server is shared), with
post-clone SQL run before the clone opens. The source's bucket prefix is left byte for byte alone;
an unconfirmed run changes nothing; a second clone refreshes the first."""

from __future__ import annotations

import shlex

import pytest
from labtools import host_state_digest, lab_ssh, refused

CLONE = "acc"
HOSTS = ("acc1", "acc2", "acc3")
PSQL = "runuser -u postgres -- psql -XAt -v ON_ERROR_STOP=1 -h /var/run/postgresql "
ANONYMISE = "update public.customers set email = 'customer' || id || '@example.invalid'"


def _sql(lab, host: str, sql: str, db: str = "postgres") -> str:
    return lab_ssh(lab, host, PSQL + f"-d {db} -c " + shlex.quote(sql)).stdout.strip()


@pytest.fixture(scope="module")
def acc(lab, backed_up):
    from blocks.register import ClusterFiles, register_cluster

    register_cluster(ClusterFiles.for_lab(lab.paths.lab, CLONE))
    yield CLONE
    for host in HOSTS:  # the rest of the suite runs without the clone's load (the hosts stay up)
        lab_ssh(lab, host, "systemctl stop patroni.service etcd.service haproxy.service", check=False)


def _source_objects():
    """key -> (size, etag) under the source's prefix, read with the source's own key."""
    from tasks.adapters.s3 import ObjectStore
    from tasks.backup import store_endpoint
    from tasks.context import context_for

    ctx = context_for("lab", fresh=True)
    with ObjectStore(store_endpoint(ctx)) as store:
        return store.keys(ctx.inventory.cluster.object_store.bucket, "lab/")


def _clone_primary():
    from tasks.context import context_for
    from tasks.ha import primary_of

    return primary_of(context_for(CLONE, fresh=True)).name


def test_clone_cluster_into_acceptance(lab, acc):
    from flows.restore_cluster import clone_cluster
    from tasks.context import context_for
    from tasks.ha import primary_of

    source = primary_of(context_for("lab", fresh=True)).name
    _sql(lab, source, "drop table if exists public.customers; create table public.customers "
                      "(id int primary key, email text not null)", db="app")
    _sql(lab, source, "insert into public.customers select i, 'person' || i || '@example.com' "
                      "from generate_series(1, 500) i", db="app")
    timeline = int(_sql(lab, source, "select timeline_id from pg_control_checkpoint()"))

    # Refused before anything changes: a wrong confirmation, the source as its own clone, bad SQL.
    digests = {h: host_state_digest(lab, h) for h in HOSTS}
    refused(clone_cluster(cluster=CLONE, source="lab", confirm_cluster="lab", return_state=True),
            "confirm_cluster")
    refused(clone_cluster(cluster="lab", source="lab", confirm_cluster="lab", return_state=True),
            "restore_cluster restores in place")
    refused(clone_cluster(cluster=CLONE, source="lab", post_clone_sql=[" "], confirm_cluster=CLONE,
                          return_state=True), "post_clone_sql[0]")
    plan = clone_cluster(cluster=CLONE, source="lab", dry_run=True)
    assert plan["changed"] is False and any("build_cluster" in str(r) for r in plan["plan"]), plan
    assert {h: host_state_digest(lab, h) for h in HOSTS} == digests, "a refused clone changed a host"

    before = _source_objects()
    done = clone_cluster(cluster=CLONE, source="lab", post_clone_sql=[ANONYMISE],
                         confirm_cluster=CLONE)
    assert done["changed"] and done["cluster"] == CLONE, done
    primary = done["primary"]
    assert primary in HOSTS
    streaming = {r["host"] for r in done["topology"] if str(r["state"]).startswith("streaming")}
    assert streaming == set(HOSTS) - {primary}, done["topology"]
    assert _sql(lab, primary, "select count(*), count(*) filter (where email like '%@example.invalid') "
                              "from public.customers", db="app") == "500|500", "not cloned, or not anonymised"
    assert _sql(lab, source, "select count(*) filter (where email like '%@example.com') from public.customers",
                db="app") == "500", "the source's rows changed"
    # The clone archives into its own stanza; no key to the source's repository is left on it.
    assert "--stanza=acc " in _sql(lab, primary, "show archive_command")
    assert lab_ssh(lab, primary, "ls /etc/pgbackrest/clone-source-lab.conf", check=False).returncode != 0
    # The clone's standbys carry the anonymised rows too (they were cloned after the SQL ran).
    standby = sorted(set(HOSTS) - {primary})[0]
    assert _sql(lab, standby, "select count(*) from public.customers where email like '%@example.com'",
                db="app") == "0"

    # The source's prefix: every object that was there is unchanged, and whatever is new is the
    # source's own WAL on its own timeline (its archiver runs on), never a clone's.
    after = _source_objects()
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    assert not changed, changed
    ours = f"{timeline:08X}"
    foreign = [k for k in set(after) - set(before) if "/archive/" not in k or k.rsplit("/", 1)[-1][:8] != ours]
    assert not foreign, foreign

    # A second clone refreshes the first: the source's newest rows arrive, the clone's own
    # repository starts afresh (the new timeline has the number the first clone's had).
    _sql(lab, source, "insert into public.customers values (501, 'late@example.com')", db="app")
    again = clone_cluster(cluster=CLONE, source="lab", confirm_cluster=CLONE)
    assert again["changed"], again
    assert _sql(lab, _clone_primary(), "select count(*) from public.customers", db="app") == "501"
