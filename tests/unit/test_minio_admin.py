"""tasks/adapters/minio_admin.py: the cluster's MinIO user and its prefix-scoped policy.

The policy and the plan are tested as data; the reconcile loop runs against an in-memory model
of MinIO's admin API; the TLS client is tested against a loopback HTTPS server with throwaway
certificates (no MinIO server can be installed here).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import json
import pickle
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import urllib3
from minio.error import MinioAdminException
from minio.minioadmin import MinioAdmin

from blocks.inventory import parse_inventory
from tasks.adapters import minio_admin
from tasks.adapters.backup.pgbackrest import PgBackRestDriver
from tasks.adapters.backup.walg import WalgDriver
from tasks.adapters.minio_admin import (
    AccessPlan,
    AccessState,
    AdminEndpoint,
    ClusterGrant,
    ClusterUserDisabled,
    MinioAccessSpecError,
    MinioAdminError,
    MinioAdminUnavailable,
    MinioCredentials,
    UserState,
    admin_client,
    cluster_policy,
    describe,
    ensure_cluster_access,
    http_pool,
    parse_admin_error,
    parse_policy,
    parse_user_info,
    plan_access,
    same_policy,
    scoped_prefix,
    tls_context,
)
from tasks.adapters.s3 import ObjectStoreError, ObjectStoreUnavailable
from tasks.errors import BouwsteenError

ADMIN = MinioCredentials("ADMINKEY01", "adm1n/Secret+key=")
CLUSTER = MinioCredentials("LABCLUSTER", "cl~ster.Secret_2-")
GRANT = ClusterGrant(cluster="lab", bucket="bouwsteen", prefix="lab/")
SECRETS = (ADMIN.secret_access_key, CLUSTER.secret_access_key)
CA_PLACEHOLDER = "-----BEGIN CERTIFICATE-----\nnot used by the fake\n-----END CERTIFICATE-----\n"
ENDPOINT = AdminEndpoint(address="10.0.0.21:9000", ca_pem=CA_PLACEHOLDER)


# ----------------------------------------------------------------------------- the policy, as data


def test_policy_document() -> None:
    assert cluster_policy("bouwsteen", "lab/") == {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "BucketMetadata", "Effect": "Allow",
             "Action": ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:HeadBucket"],
             "Resource": ["arn:aws:s3:::bouwsteen"]},
            {"Sid": "ListOwnPrefix", "Effect": "Allow", "Action": ["s3:ListBucket"],
             "Resource": ["arn:aws:s3:::bouwsteen"],
             "Condition": {"StringLike": {"s3:prefix": ["lab/*"]}}},
            {"Sid": "OwnObjects", "Effect": "Allow",
             "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:ListMultipartUploadParts",
                        "s3:PutObject"],
             "Resource": ["arn:aws:s3:::bouwsteen/lab/*"]},
        ],
    }
    json.dumps(cluster_policy("bouwsteen", "lab/"))  # what policy_add sends


def test_policy_is_not_readwrite() -> None:
    doc = cluster_policy("bouwsteen", "lab/")
    actions = {a for s in doc["Statement"] for a in s["Action"]}
    resources = {r for s in doc["Statement"] for r in s["Resource"]}
    assert not any("*" in a for a in actions)
    assert resources == {"arn:aws:s3:::bouwsteen", "arn:aws:s3:::bouwsteen/lab/*"}
    for forbidden in ("s3:ListAllMyBuckets", "s3:CreateBucket", "s3:DeleteBucket", "s3:PutBucketPolicy",
                      "s3:DeleteBucketPolicy", "s3:PutLifecycleConfiguration", "s3:ListBucketVersions",
                      "s3:DeleteObjectVersion"):
        assert forbidden not in actions
    # Only the listing statement is on the bucket with a data-revealing action, and it is conditioned.
    (listing,) = [s for s in doc["Statement"] if "s3:ListBucket" in s["Action"]]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["lab/*"]}}


@pytest.mark.parametrize("prefix", ["lab", "lab/", "/lab", "/lab/", "lab//"])
def test_prefix_normalised(prefix: str) -> None:
    assert scoped_prefix(prefix) == "lab/"
    assert cluster_policy("bouwsteen", prefix) == cluster_policy("bouwsteen", "lab/")


def test_nested_prefix() -> None:
    assert scoped_prefix("/lab/pg17") == "lab/pg17/"


@pytest.mark.parametrize("prefix", ["", "/", "*", "lab/*", "la?", "${aws:username}", "lab/../other", "./lab",
                                    "a b", "lab,x", "lab\n"])
def test_prefix_refused(prefix: str) -> None:
    with pytest.raises(MinioAccessSpecError):
        scoped_prefix(prefix)


@pytest.mark.parametrize("bucket", ["", "ab", "Bouwsteen", "bucket/x", "b*", "-abc"])
def test_bucket_refused(bucket: str) -> None:
    with pytest.raises(MinioAccessSpecError):
        cluster_policy(bucket, "lab/")


def _allowed(doc: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """A small model of MinIO's evaluation of Allow statements (wildcard ARNs, StringLike on s3:prefix).

    MinIO's StringLike with the key absent from the request (no `prefix` query) is false."""
    for st in doc["Statement"]:
        if st["Effect"] != "Allow" or action not in st["Action"]:
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern) for pattern in st["Resource"]):
            continue
        like = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if like is not None and (prefix is None or not any(fnmatch.fnmatchcase(prefix, p) for p in like)):
            continue
        return True
    return False


BUCKET = "arn:aws:s3:::bouwsteen"


@pytest.mark.parametrize(("action", "resource", "prefix", "allowed"), [
    # its own prefix: everything the backup tools do
    ("s3:ListBucket", BUCKET, "lab/", True),
    ("s3:ListBucket", BUCKET, "lab/pg17/archive/main/17-1/", True),
    ("s3:GetObject", f"{BUCKET}/lab/pg17/backup/main/backup.info", None, True),
    ("s3:PutObject", f"{BUCKET}/lab/pg17/archive/main/17-1/0000000100000000/seg", None, True),
    ("s3:DeleteObject", f"{BUCKET}/lab/.bouwsteen-prefix", None, True),
    ("s3:AbortMultipartUpload", f"{BUCKET}/lab/pg17/basebackups_005/part", None, True),
    ("s3:HeadBucket", BUCKET, None, True),
    ("s3:GetBucketLocation", BUCKET, None, True),
    # another cluster's objects, whose name merely starts the same
    ("s3:ListBucket", BUCKET, "lab2/", False),
    ("s3:GetObject", f"{BUCKET}/lab2/pg17/backup/main/backup.info", None, False),
    ("s3:DeleteObject", f"{BUCKET}/prod/pg17/archive/main/x", None, False),
    ("s3:PutObject", f"{BUCKET}/labx", None, False),
    # the bucket root, without or with an empty prefix, and a prefix that is not under ours
    ("s3:ListBucket", BUCKET, None, False),
    ("s3:ListBucket", BUCKET, "", False),
    ("s3:ListBucket", BUCKET, "la", False),
    # another bucket
    ("s3:GetObject", "arn:aws:s3:::other/lab/x", None, False),
    ("s3:ListBucket", "arn:aws:s3:::other", "lab/", False),
])
def test_policy_isolates_clusters(action: str, resource: str, prefix: str | None, allowed: bool) -> None:
    assert _allowed(cluster_policy("bouwsteen", "lab/"), action, resource, prefix) is allowed


def _inventory(**cluster: Any):
    return parse_inventory({
        "cluster": {"name": "lab", "network": "10.0.0.0/24",
                    "object_store": {"host": "backup1", "endpoint": "https://backup1.bouwsteen.lab:9000",
                                     "bucket": "bouwsteen"}, **cluster},
        "hosts": [{"name": "pg1", "address": "10.0.0.11", "roles": ["db"]},
                  {"name": "pg2", "address": "10.0.0.12", "roles": ["db"]},
                  {"name": "pg3", "address": "10.0.0.13", "roles": ["db"]},
                  {"name": "backup1", "address": "10.0.0.21", "roles": ["backup"]}],
    })


@pytest.mark.parametrize("version", [15, 17])
def test_backup_drivers_write_inside_the_granted_prefix(version: int) -> None:
    """The grant is per cluster (`<cluster>/`), so each major version's repository is inside it."""
    inv = _inventory(postgres={"version": version})
    doc = cluster_policy(inv.cluster.object_store.bucket, f"{inv.cluster.name}/")
    pgbackrest_key = PgBackRestDriver().repo_path(inv).lstrip("/") + "/archive/main/archive.info"
    walg_key = WalgDriver().s3_prefix(inv).split("://", 1)[1].split("/", 1)[1] + "/basebackups_005/x"
    for key in (pgbackrest_key, walg_key):
        assert _allowed(doc, "s3:PutObject", f"{BUCKET}/{key}")
        assert _allowed(doc, "s3:ListBucket", BUCKET, key.rsplit("/", 1)[0] + "/")


def test_policy_name() -> None:
    assert GRANT.policy_name == "bouwsteen-lab"
    GRANT.check()


# ----------------------------------------------------------------------------- same_policy


def test_same_policy_ignores_order_and_sid() -> None:
    doc = cluster_policy("bouwsteen", "lab/")
    shuffled = {"Version": doc["Version"], "Statement": [
        {**{k: v for k, v in st.items() if k != "Sid"}, "Action": list(reversed(st["Action"]))}
        for st in reversed(doc["Statement"])
    ]}
    assert same_policy(doc, shuffled)


def test_same_policy_accepts_single_strings() -> None:
    a = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"],
                                                 "Resource": ["arn:aws:s3:::b/p/*"]}]}
    b = {"Version": "2012-10-17", "Statement": {"Effect": "Allow", "Action": "s3:GetObject",
                                                "Resource": "arn:aws:s3:::b/p/*"}}
    assert same_policy(a, b)


@pytest.mark.parametrize("other", [
    cluster_policy("bouwsteen", "lab2/"),
    cluster_policy("other", "lab/"),
    {**cluster_policy("bouwsteen", "lab/"), "Version": "2008-10-17"},
    {"Version": "2012-10-17", "Statement": cluster_policy("bouwsteen", "lab/")["Statement"][:2]},
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}]},
    None,
    "not a policy",
])
def test_different_policies(other: Any) -> None:
    assert not same_policy(cluster_policy("bouwsteen", "lab/"), other)


# ----------------------------------------------------------------------------- parsing answers


def test_parse_user_info() -> None:
    text = json.dumps({"policyName": "bouwsteen-lab,readwrite", "status": "enabled", "memberOf": ["ops"],
                       "updatedAt": "2026-01-01T00:00:00Z"})
    assert parse_user_info(text) == UserState(enabled=True, policies=("bouwsteen-lab", "readwrite"), groups=("ops",))
    assert parse_user_info('{"status": "disabled"}') == UserState(enabled=False)


@pytest.mark.parametrize("text", ["<html>", "[1, 2]"])
def test_parse_user_info_refuses_garbage(text: str) -> None:
    with pytest.raises(MinioAdminError):
        parse_user_info(text)


def test_parse_policy_both_answer_versions() -> None:
    doc = cluster_policy("bouwsteen", "lab/")
    assert parse_policy(json.dumps(doc, indent=1)) == doc
    assert parse_policy(json.dumps({"PolicyName": "bouwsteen-lab", "Policy": doc})) == doc
    with pytest.raises(MinioAdminError):
        parse_policy("nope")


def test_parse_admin_error() -> None:
    body = json.dumps({"Code": "XMinioAdminNoSuchUser", "Message": "The specified user does not exist.",
                       "Resource": "/minio/admin/v3/user-info"})
    assert parse_admin_error("404", body) == (404, "XMinioAdminNoSuchUser", "The specified user does not exist.")
    assert parse_admin_error("502", "Bad Gateway") == (502, "", "Bad Gateway")
    assert parse_admin_error("", "") == (0, "", "")


# ----------------------------------------------------------------------------- plan_access (a table)

WANTED = cluster_policy("bouwsteen", "lab/")
OWN = UserState(enabled=True, policies=("bouwsteen-lab",))


@pytest.mark.parametrize(("state", "plan", "sentence"), [
    (AccessState(policy=None, user=None),
     AccessPlan(policy="create", user="create", attach=("bouwsteen-lab",)),
     "MinIO: created policy bouwsteen-lab (only bouwsteen/lab/); created user LABCLUSTER; attached bouwsteen-lab."),
    (AccessState(policy=WANTED, user=OWN, secret_matches=True),
     AccessPlan(),
     "MinIO user LABCLUSTER and policy bouwsteen-lab (only bouwsteen/lab/) already as wanted; nothing changed."),
    (AccessState(policy=cluster_policy("bouwsteen", "old/"), user=OWN, secret_matches=True),
     AccessPlan(policy="update"),
     "MinIO: updated policy bouwsteen-lab (only bouwsteen/lab/)."),
    (AccessState(policy=WANTED, user=OWN, secret_matches=False),
     AccessPlan(user="reset secret"),
     "MinIO: set user LABCLUSTER's secret to the registered one."),
    (AccessState(policy=WANTED, user=UserState(enabled=True, policies=("readwrite",)), secret_matches=True),
     AccessPlan(detach=("readwrite",), attach=("bouwsteen-lab",)),
     "MinIO: detached readwrite; attached bouwsteen-lab."),
    (AccessState(policy=WANTED, user=UserState(enabled=True, policies=("bouwsteen-lab", "readwrite", "diagnostics")),
                 secret_matches=True),
     AccessPlan(detach=("diagnostics", "readwrite")),
     "MinIO: detached diagnostics, readwrite."),
    (AccessState(policy=WANTED, user=UserState(enabled=True, policies=("bouwsteen-lab",), groups=("ops",)),
                 secret_matches=True),
     AccessPlan(groups=("ops",)),
     ("MinIO user LABCLUSTER and policy bouwsteen-lab (only bouwsteen/lab/) already as wanted; nothing changed. "
      "Note: the user is also in group(s) ops, whose policies apply too.")),
], ids=["fresh", "as-wanted", "policy-drift", "secret-drift", "readwrite-attached", "extra-policies", "groups"])
def test_plan_access(state: AccessState, plan: AccessPlan, sentence: str) -> None:
    got = plan_access(state, GRANT, "LABCLUSTER")
    assert got == plan
    assert describe(got, GRANT, "LABCLUSTER") == sentence
    for value in SECRETS:
        assert value not in sentence


def test_plan_refuses_disabled_user() -> None:
    with pytest.raises(ClusterUserDisabled) as info:
        plan_access(AccessState(policy=WANTED, user=UserState(enabled=False, policies=("bouwsteen-lab",))),
                    GRANT, "LABCLUSTER")
    assert "LABCLUSTER" in str(info.value) and "disabled" in str(info.value)


# ----------------------------------------------------------------------------- reconcile against a model of MinIO


class FakeMinio:
    """MinIO's admin API as far as this module uses it: users, canned policies, attachments."""

    def __init__(self, root: MinioCredentials):
        self.root = root
        self.users: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, dict] = {"readwrite": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}]}}
        self.writes: list[str] = []
        self.fail: Exception | None = None

    @staticmethod
    def error(status: int, code: str, message: str = "") -> MinioAdminException:
        return MinioAdminException(str(status), json.dumps({"Code": code, "Message": message}))

    def authenticate(self, creds: MinioCredentials) -> bool:
        if self.fail is not None:
            raise self.fail
        if creds == self.root:
            return True
        user = self.users.get(creds.access_key_id)
        if user is None or user["status"] != "enabled":
            raise self.error(403, "InvalidAccessKeyId")
        if user["secret"] != creds.secret_access_key:
            raise self.error(403, "SignatureDoesNotMatch")
        return False


class FakeClient:
    def __init__(self, server: FakeMinio, creds: MinioCredentials):
        self.server, self.creds = server, creds

    def _root(self) -> None:
        if not self.server.authenticate(self.creds):
            raise FakeMinio.error(403, "AccessDenied", "Access Denied.")

    def user_info(self, access_key: str) -> str:
        is_root = self.server.authenticate(self.creds)
        if not is_root and access_key != self.creds.access_key_id:
            raise FakeMinio.error(403, "AccessDenied")
        user = self.server.users.get(access_key)
        if user is None:
            raise FakeMinio.error(404, "XMinioAdminNoSuchUser", "The specified user does not exist.")
        return json.dumps({"policyName": ",".join(user["policies"]), "status": user["status"],
                           "memberOf": user["groups"]})

    def user_add(self, access_key: str, secret_key: str) -> str:
        self._root()
        if access_key == self.server.root.access_key_id:
            raise FakeMinio.error(400, "XMinioAdminInvalidArgument")
        old = self.server.users.get(access_key, {"policies": [], "groups": []})
        self.server.users[access_key] = {**old, "secret": secret_key, "status": "enabled"}
        self.server.writes.append(f"user_add {access_key}")
        return ""

    def policy_info(self, policy_name: str) -> str:
        self._root()
        if policy_name not in self.server.policies:
            raise FakeMinio.error(404, "XMinioAdminNoSuchPolicy", "The canned policy does not exist.")
        # MinIO hands the document back re-marshalled: keys reordered, indented.
        doc = self.server.policies[policy_name]
        return json.dumps({"Statement": list(reversed(doc["Statement"])), "Version": doc["Version"]}, indent=1)

    def policy_add(self, policy_name: str, policy_file: Any = None, policy: dict | None = None) -> str:
        self._root()
        assert policy_file is None and isinstance(policy, dict)
        self.server.policies[policy_name] = json.loads(json.dumps(policy))
        self.server.writes.append(f"policy_add {policy_name}")
        return ""

    def attach_policy(self, policies: list[str], user: str | None = None, group: str | None = None) -> str:
        self._root()
        u = self.server.users[user]
        new = [p for p in policies if p not in u["policies"]]
        for p in policies:
            if p not in self.server.policies:
                raise FakeMinio.error(404, "XMinioAdminNoSuchPolicy")
        if not new:
            raise FakeMinio.error(400, "XMinioAdminPolicyChangeAlreadyApplied")
        u["policies"] = u["policies"] + new
        self.server.writes.append(f"attach {','.join(new)} {user}")
        return ""

    def detach_policy(self, policies: list[str], user: str | None = None, group: str | None = None) -> str:
        self._root()
        u = self.server.users[user]
        if not any(p in u["policies"] for p in policies):
            raise FakeMinio.error(400, "XMinioAdminPolicyChangeAlreadyApplied")
        u["policies"] = [p for p in u["policies"] if p not in policies]
        self.server.writes.append(f"detach {','.join(policies)} {user}")
        return ""


def run(server: FakeMinio, admin: MinioCredentials = ADMIN, cluster: MinioCredentials = CLUSTER,
        grant: ClusterGrant = GRANT):
    return ensure_cluster_access(ENDPOINT, admin, cluster, grant, connect=lambda _e, creds: FakeClient(server, creds))


def test_first_run_creates_second_run_changes_nothing() -> None:
    server = FakeMinio(ADMIN)
    first = run(server)
    assert first.changed
    assert server.writes == ["policy_add bouwsteen-lab", "user_add LABCLUSTER", "attach bouwsteen-lab LABCLUSTER"]
    assert server.users["LABCLUSTER"]["policies"] == ["bouwsteen-lab"]
    assert same_policy(server.policies["bouwsteen-lab"], WANTED)
    server.writes.clear()
    second = run(server)
    assert not second.changed and server.writes == []
    assert second.sentence.endswith("already as wanted; nothing changed.")


def test_readwrite_from_the_old_mcli_line_is_detached() -> None:
    server = FakeMinio(ADMIN)
    server.users["LABCLUSTER"] = {"secret": CLUSTER.secret_access_key, "status": "enabled", "policies": ["readwrite"],
                                  "groups": []}
    outcome = run(server)
    assert server.users["LABCLUSTER"]["policies"] == ["bouwsteen-lab"]
    assert server.writes == ["policy_add bouwsteen-lab", "detach readwrite LABCLUSTER", "attach bouwsteen-lab LABCLUSTER"]
    assert outcome.sentence == ("MinIO: created policy bouwsteen-lab (only bouwsteen/lab/); detached readwrite; "
                                "attached bouwsteen-lab.")


def test_rotated_secret_is_set_again_and_attachments_kept() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    server.users["LABCLUSTER"]["secret"] = "someone-else-s-secret"
    server.writes.clear()
    outcome = run(server)
    assert server.writes == ["user_add LABCLUSTER"]
    assert server.users["LABCLUSTER"]["secret"] == CLUSTER.secret_access_key
    assert outcome.sentence == "MinIO: set user LABCLUSTER's secret to the registered one."


def test_policy_drift_is_rewritten() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    server.policies["bouwsteen-lab"] = cluster_policy("bouwsteen", "other/")
    server.writes.clear()
    run(server)
    assert server.writes == ["policy_add bouwsteen-lab"]
    assert same_policy(server.policies["bouwsteen-lab"], WANTED)


def test_two_clusters_get_two_users_and_policies() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    run(server, cluster=MinioCredentials("PRODCLUSTER", "pr0d-Secret-key"),
        grant=ClusterGrant(cluster="prod", bucket="bouwsteen", prefix="prod/"))
    assert server.users["LABCLUSTER"]["policies"] == ["bouwsteen-lab"]
    assert server.users["PRODCLUSTER"]["policies"] == ["bouwsteen-prod"]
    assert not same_policy(server.policies["bouwsteen-lab"], server.policies["bouwsteen-prod"])


RESTORE = MinioCredentials("LABRESTORE", "rest0re.Secret_3-")
RESTORE_GRANT = ClusterGrant(cluster="lab", bucket="bouwsteen", prefix="lab/", read_only=True)


def test_the_restore_user_reads_the_clusters_prefix_only() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    outcome = ensure_cluster_access(ENDPOINT, ADMIN, RESTORE, RESTORE_GRANT, other_users=(CLUSTER.access_key_id,),
                                    connect=lambda _e, creds: FakeClient(server, creds))
    assert server.users["LABRESTORE"]["policies"] == ["bouwsteen-lab.read-only"]
    assert server.users["LABCLUSTER"]["policies"] == ["bouwsteen-lab"], "the cluster's own user is untouched"
    assert same_policy(server.policies["bouwsteen-lab.read-only"], cluster_policy("bouwsteen", "lab/", read_only=True))
    assert outcome.sentence == ("MinIO: created policy bouwsteen-lab.read-only (only bouwsteen/lab/, read-only); "
                                "created user LABRESTORE; attached bouwsteen-lab.read-only.")
    assert RESTORE.secret_access_key not in outcome.sentence
    again = ensure_cluster_access(ENDPOINT, ADMIN, RESTORE, RESTORE_GRANT, other_users=(CLUSTER.access_key_id,),
                                  connect=lambda _e, creds: FakeClient(server, creds))
    assert not again.changed


def test_the_restore_grant_never_takes_over_the_clusters_user() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    server.writes.clear()
    with pytest.raises(MinioAccessSpecError, match="read-only user's access key must differ"):
        ensure_cluster_access(ENDPOINT, ADMIN, CLUSTER, RESTORE_GRANT, other_users=(CLUSTER.access_key_id,),
                              connect=lambda _e, creds: FakeClient(server, creds))
    assert server.writes == [] and server.users["LABCLUSTER"]["policies"] == ["bouwsteen-lab"]


@pytest.mark.parametrize(("cluster", "other"), [("lab", "lab-read-only"), ("lab-read", "lab")])
def test_no_cluster_name_makes_another_clusters_read_only_policy_name(cluster: str, other: str) -> None:
    names = {ClusterGrant(cluster=c, bucket="b0b", prefix=f"{c}/", read_only=ro).policy_name
             for c in (cluster, other) for ro in (False, True)}
    assert len(names) == 4
    assert ClusterGrant(cluster="lab", bucket="b0b", prefix="lab/", read_only=True).policy_name == "bouwsteen-lab.read-only"


READ_ONLY = cluster_policy("bouwsteen", "lab/", read_only=True)


@pytest.mark.parametrize(("action", "resource", "prefix", "allowed"), [
    # what a restore and the recovery's archive-get / backup-fetch and wal-fetch do
    ("s3:ListBucket", BUCKET, "lab/pg15/backup/lab/", True),
    ("s3:ListBucket", BUCKET, "lab/pg15/archive/lab/15-1/0000000100000000/", True),
    ("s3:GetObject", f"{BUCKET}/lab/pg15/backup/lab/backup.info", None, True),
    ("s3:HeadBucket", BUCKET, None, True),
    ("s3:GetBucketLocation", BUCKET, None, True),
    # nothing that changes the repository
    ("s3:PutObject", f"{BUCKET}/lab/pg15/archive/lab/15-1/0000000100000000/seg", None, False),
    ("s3:DeleteObject", f"{BUCKET}/lab/pg15/backup/lab/backup.info", None, False),
    ("s3:AbortMultipartUpload", f"{BUCKET}/lab/pg15/x", None, False),
    ("s3:ListMultipartUploadParts", f"{BUCKET}/lab/pg15/x", None, False),
    # and no other cluster's objects
    ("s3:GetObject", f"{BUCKET}/lab2/pg15/backup/lab2/backup.info", None, False),
    ("s3:ListBucket", BUCKET, "lab2/", False),
    ("s3:ListBucket", BUCKET, None, False),
])
def test_read_only_policy(action: str, resource: str, prefix: str | None, allowed: bool) -> None:
    assert _allowed(READ_ONLY, action, resource, prefix) is allowed


def test_read_only_differs_from_the_clusters_policy_in_object_actions_only() -> None:
    full = {st["Sid"]: st for st in cluster_policy("bouwsteen", "lab/")["Statement"]}
    ro = {st["Sid"]: st for st in READ_ONLY["Statement"]}
    assert ro["BucketMetadata"] == full["BucketMetadata"] and ro["ListOwnPrefix"] == full["ListOwnPrefix"]
    assert ro["OwnObjects"] == {**full["OwnObjects"], "Action": ["s3:GetObject"]}
    assert not same_policy(READ_ONLY, WANTED)


def test_disabled_user_is_left_alone() -> None:
    server = FakeMinio(ADMIN)
    run(server)
    server.users["LABCLUSTER"]["status"] = "disabled"
    server.writes.clear()
    with pytest.raises(ClusterUserDisabled):
        run(server)
    assert server.writes == []


def test_same_key_for_admin_and_cluster_refused_before_any_request() -> None:
    calls = []
    with pytest.raises(MinioAccessSpecError):
        ensure_cluster_access(ENDPOINT, ADMIN, MinioCredentials(ADMIN.access_key_id, "other-secret-1"), GRANT,
                              connect=lambda *a: calls.append(a))
    assert calls == []


def test_bad_grant_refused_before_any_request() -> None:
    calls = []
    with pytest.raises(MinioAccessSpecError):
        ensure_cluster_access(ENDPOINT, ADMIN, CLUSTER, ClusterGrant("lab", "bouwsteen", "*"),
                              connect=lambda *a: calls.append(a))
    assert calls == []


def test_admin_refused_is_an_error_with_code() -> None:
    server = FakeMinio(MinioCredentials("SOMEONEELSE", "not-our-admin"))
    with pytest.raises(MinioAdminError) as info:
        run(server)
    assert info.value.status == 403 and info.value.code == "InvalidAccessKeyId"
    assert not isinstance(info.value, MinioAdminUnavailable)


@pytest.mark.parametrize("failure", [
    urllib3.exceptions.MaxRetryError(None, "/minio/admin/v3/info-canned-policy",
                                     urllib3.exceptions.NewConnectionError(None, "Connection refused")),
    urllib3.exceptions.ProtocolError("Connection aborted."),
    ConnectionResetError("reset by peer"),
    MinioAdminException("503", json.dumps({"Code": "XMinioServerNotInitialized", "Message": "Server not initialized"})),
])
def test_unavailable_is_transient(failure: Exception) -> None:
    server = FakeMinio(ADMIN)
    server.fail = failure
    with pytest.raises(MinioAdminUnavailable) as info:
        run(server)
    assert isinstance(info.value, ObjectStoreUnavailable)
    assert str(info.value).startswith("MinIO admin API at 10.0.0.21:9000: policy info bouwsteen-lab: ")


def test_errors_never_carry_a_secret() -> None:
    """Even a server (or library) message that echoes a secret is scrubbed before it is raised."""
    server = FakeMinio(ADMIN)
    server.fail = MinioAdminException("400", json.dumps({"Code": "XMinioAdminInvalidArgument",
                                                         "Message": f"bad {CLUSTER.secret_access_key} {ADMIN.secret_access_key}"}))
    with pytest.raises(MinioAdminError) as info:
        run(server)
    text = str(info.value)
    assert "***" in text
    for value in SECRETS:
        assert value not in text and value not in repr(info.value.args)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_error_types() -> None:
    for cls in (MinioAdminError, MinioAdminUnavailable, MinioAccessSpecError, ClusterUserDisabled):
        assert issubclass(cls, BouwsteenError)
    assert issubclass(MinioAdminError, ObjectStoreError)
    assert issubclass(MinioAccessSpecError, ValueError)
    err = pickle.loads(pickle.dumps(MinioAdminError("x: HTTP 404", status=404, code="XMinioAdminNoSuchUser")))
    assert (str(err), err.status, err.code) == ("x: HTTP 404", 404, "XMinioAdminNoSuchUser")


def test_credentials_repr_hides_the_secret() -> None:
    assert CLUSTER.secret_access_key not in repr(CLUSTER)
    assert repr(CLUSTER) == "MinioCredentials(LABCLUSTER, secret=***)"


# ----------------------------------------------------------------------------- TLS: the site CA and nothing else


def test_tls_context_trusts_only_the_given_ca(pki) -> None:
    context = tls_context(pki["ca_pem"])
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # not the system store


@pytest.mark.parametrize("ca", ["", "   \n", "not a certificate",
                                "-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n"])
def test_tls_context_refuses_missing_or_broken_ca(ca: str) -> None:
    with pytest.raises(MinioAccessSpecError):
        tls_context(ca)


def test_admin_client_is_minio_admin_over_our_pool(pki) -> None:
    endpoint = AdminEndpoint(address="10.0.0.21:9000", ca_pem=pki["ca_pem"], region="us-east-1")
    pool = http_pool(endpoint)
    assert pool.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED"
    assert pool.connection_pool_kw["ssl_context"].check_hostname
    client = admin_client(endpoint, ADMIN)
    assert isinstance(client, MinioAdmin)
    assert CLUSTER.secret_access_key not in repr(vars(client))


# -- a loopback HTTPS server standing in for MinIO (answers and records; no signature check)


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(issuer_key, issuer, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("object store")).issuer_name(issuer.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(issuer_key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    site_key, site = ca("site CA")
    other_key, other = ca("someone else's CA")
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return {
        "ca_pem": site.public_bytes(serialization.Encoding.PEM).decode(),
        "good": leaf(site_key, site, loopback),
        "other_ca": leaf(other_key, other, loopback),
        "wrong_name": leaf(site_key, site, [x509.DNSName("backup1.bouwsteen.lab")]),
    }


@pytest.fixture
def https_server(tmp_path, pki):
    servers = []

    def start(which: str):
        cert_pem, key_pem = pki[which]
        (tmp_path / f"{which}.crt").write_bytes(cert_pem)
        (tmp_path / f"{which}.key").write_bytes(key_pem)
        seen: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen.append({"line": self.requestline, "headers": str(self.headers),
                             "body": self.rfile.read(length) if length else b""})
                body = json.dumps({"policyName": "bouwsteen-lab", "status": "enabled"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / f"{which}.crt", tmp_path / f"{which}.key")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _call(endpoint: AdminEndpoint, fn):
    return minio_admin._call("test call", endpoint, minio_admin._Scrubber(SECRETS), fn)


def test_verified_tls_round_trip_and_no_secret_on_the_wire(https_server, pki) -> None:
    address, seen = https_server("good")
    endpoint = AdminEndpoint(address=address, ca_pem=pki["ca_pem"], timeout=5)
    client = admin_client(endpoint, ADMIN)
    assert parse_user_info(_call(endpoint, lambda: client.user_info("LABCLUSTER"))).policies == ("bouwsteen-lab",)
    _call(endpoint, lambda: client.user_add("LABCLUSTER", CLUSTER.secret_access_key))
    _call(endpoint, lambda: client.policy_add("bouwsteen-lab", policy=WANTED))
    lines = [s["line"] for s in seen]
    assert lines[0].startswith("GET /minio/admin/v3/user-info?accessKey=LABCLUSTER ")
    assert lines[1].startswith("PUT /minio/admin/v3/add-user?accessKey=LABCLUSTER ")
    assert lines[2].startswith("PUT /minio/admin/v3/add-canned-policy?name=bouwsteen-lab ")
    assert json.loads(seen[2]["body"]) == WANTED
    for request in seen:
        for value in SECRETS:
            # user_add's body is encrypted with the admin secret; nothing carries a secret in clear.
            assert value not in request["line"] and value not in request["headers"]
            assert value.encode() not in request["body"]


@pytest.mark.parametrize("which", ["other_ca", "wrong_name"])
def test_tls_refuses_a_certificate_the_site_ca_did_not_sign_for_this_address(https_server, pki, which: str) -> None:
    address, seen = https_server(which)
    endpoint = AdminEndpoint(address=address, ca_pem=pki["ca_pem"], timeout=5)
    client = admin_client(endpoint, ADMIN)
    with pytest.raises(MinioAdminError) as info:
        _call(endpoint, lambda: client.user_info("LABCLUSTER"))
    assert "TLS verification failed" in str(info.value)
    assert ("IP address mismatch" if which == "wrong_name" else "unable to get local issuer") in str(info.value)
    assert not isinstance(info.value, MinioAdminUnavailable)  # a retry cannot fix a certificate
    assert seen == []  # no request was sent


def test_nothing_listening_is_unavailable(pki) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = AdminEndpoint(address=f"127.0.0.1:{port}", ca_pem=pki["ca_pem"], timeout=2, connect_retries=0)
    client = admin_client(endpoint, ADMIN)
    with pytest.raises(MinioAdminUnavailable) as info:
        _call(endpoint, lambda: client.user_info("LABCLUSTER"))
    assert "NewConnectionError" in str(info.value)
