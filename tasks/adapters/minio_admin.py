"""MinIO's admin API from the controller: the cluster's own user, limited to its bucket prefix.

The backup server rollout gives each cluster a MinIO user whose canned policy reaches only
`<bucket>/<cluster>/…`, so one cluster's key can neither read nor delete another cluster's
backups; where the credentials name a restore key, that key gets a user of its own whose policy
only reads the same prefix (the restore host's key cannot write or delete). The controller
talks to MinIO's admin API (`/minio/admin/v3/…`) with minio-py's `MinioAdmin`, over TLS
verified against the site's CA only; nothing runs on the backup host and no secret ever appears
on a command line there.

Three parts, so that everything but the HTTP calls is tested as data:

* `cluster_policy` / `same_policy`: the policy document and how two documents compare (pure);
* `plan_access`: from what the server has (`AccessState`) to what must change (pure);
* `ensure_cluster_access`: reads the state, applies the plan, answers with one sentence. The
  client is injected (`connect`), so the reconcile logic runs against a fake in the unit tests.

Secrets are taken as arguments and never logged, returned or put in an exception's text; server
and library messages are scrubbed of them before they become part of an error. No Prefect here.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3
from minio.credentials import StaticProvider
from minio.error import MinioAdminException
from minio.minioadmin import MinioAdmin

from tasks.adapters.s3 import ObjectStoreError, ObjectStoreUnavailable
from tasks.errors import BouwsteenError

POLICY_VERSION = "2012-10-17"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# A prefix goes verbatim into policy ARNs and conditions, where `*`, `?` and `${…}` are wildcards
# and variables: allow only plain path segments.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_POLICY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# MinIO's admin API error codes this module acts on (cmd/api-errors.go in minio/minio).
NO_SUCH_USER = "XMinioAdminNoSuchUser"
NO_SUCH_POLICY = "XMinioAdminNoSuchPolicy"
ALREADY_APPLIED = "XMinioAdminPolicyChangeAlreadyApplied"
# A request signed with the cluster's key: these mean "the key or its secret is not what we hold".
_WRONG_KEY = frozenset({"SignatureDoesNotMatch", "InvalidAccessKeyId"})


# ----------------------------------------------------------------------------- errors


class MinioAccessSpecError(BouwsteenError, ValueError):
    """The grant or its inputs (bucket, prefix, keys, CA) cannot be used; nothing was sent."""


class MinioAdminUnavailable(ObjectStoreUnavailable):
    """MinIO's admin API does not answer, or answers 5xx (transient)."""


class MinioAdminError(ObjectStoreError):
    """MinIO's admin API refused a request or answered something unexpected.

    `status` is the HTTP status (0 when there was none, e.g. a TLS failure), `code` MinIO's
    error code (`XMinioAdminNoSuchUser`, `AccessDenied`, …) or ""."""

    def __init__(self, message: str, status: int = 0, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code

    def __reduce__(self):
        return (type(self), (str(self), self.status, self.code))


class ClusterUserDisabled(MinioAdminError):
    """The cluster's user exists but is disabled: an operator's decision this rollout won't undo."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True, repr=False)
class MinioCredentials:
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return f"MinioCredentials({self.access_key_id}, secret=***)"


@dataclass(frozen=True)
class AdminEndpoint:
    """Where the controller reaches MinIO: `address` is host:port, in the certificate's SAN."""

    address: str
    ca_pem: str
    region: str = "us-east-1"
    timeout: float = 10
    connect_retries: int = 3  # only failures to connect are retried (nothing reached the server)


@dataclass(frozen=True)
class ClusterGrant:
    """One cluster's share of the bucket: everything under `prefix` (e.g. "lab/"), nothing else.

    `read_only`: the restore host's user, which reads that share (restores, WAL for recovery) and
    can neither write nor delete a thing: a drill cannot damage the backups it proves."""

    cluster: str
    bucket: str
    prefix: str
    read_only: bool = False

    @property
    def policy_name(self) -> str:
        # '.' cannot occur in a cluster name: no cluster's name makes another's read-only policy name.
        return f"bouwsteen-{self.cluster}" + (".read-only" if self.read_only else "")

    @property
    def access(self) -> str:
        return "read-only" if self.read_only else "read-write"

    def policy(self) -> dict[str, Any]:
        return cluster_policy(self.bucket, self.prefix, read_only=self.read_only)

    def check(self) -> None:
        if not _POLICY_NAME.fullmatch(self.policy_name):
            raise MinioAccessSpecError(f"cluster name {self.cluster!r} does not make a valid MinIO policy name")
        self.policy()


# ----------------------------------------------------------------------------- policy (pure)


def scoped_prefix(prefix: str) -> str:
    """`prefix` as a policy needs it: no leading slash, exactly one trailing slash.

    The trailing slash is what keeps cluster `lab` out of cluster `lab2`'s objects."""
    stripped = prefix.strip("/")
    segments = stripped.split("/") if stripped else []
    if not segments or any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise MinioAccessSpecError(
            f"object store prefix {prefix!r}: must be one or more path segments of [A-Za-z0-9_.-] "
            "(no wildcards, no variables, not the bucket root)"
        )
    return stripped + "/"


def cluster_policy(bucket: str, prefix: str, *, read_only: bool = False) -> dict[str, Any]:
    """The canned policy of one cluster's user: its own prefix in one bucket, and nothing else.

    `read_only` (the restore host's user): the same listing and bucket metadata, and of the
    object actions only s3:GetObject (GET and HEAD): what pgBackRest's restore and archive-get
    and WAL-G's backup-fetch and wal-fetch call. No put, delete, copy or multipart upload.

    What WAL-G and pgBackRest call, by MinIO action (MinIO checks s3:PutObject for the multipart
    create/upload-part/complete calls, s3:GetObject for HEAD, s3:DeleteObject per key of a
    multi-object delete, s3:PutObject + s3:GetObject for a server-side copy):
    * ListObjects(V2) with a prefix under the cluster's: s3:ListBucket, only with that s3:prefix;
    * Get/Head/Put/Delete/Copy of objects, multipart uploads (WAL-G's uploader aborts a failed
      one; ListParts for resuming): object actions on `bucket/prefix*` only;
    * bucket metadata only: GetBucketLocation (WAL-G's region lookup when no region is set),
      GetBucketVersioning (WAL-G asks before deletes), HeadBucket (MinIO checks s3:HeadBucket
      first since RELEASE.2025-09, older servers check s3:ListBucket, which the prefix condition
      denies for a HEAD).
    Not granted: listing the bucket root or other prefixes, ListAllMyBuckets, bucket creation or
    deletion, bucket policy, object versions (pgBackRest's --repo-target-time would need them).
    """
    if not _BUCKET.fullmatch(bucket):
        raise MinioAccessSpecError(f"object store bucket {bucket!r}: not a valid bucket name")
    scoped = scoped_prefix(prefix)
    bucket_arn = f"arn:aws:s3:::{bucket}"
    return {
        "Version": POLICY_VERSION,
        "Statement": [
            {
                "Sid": "BucketMetadata",
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:GetBucketVersioning", "s3:HeadBucket"],
                "Resource": [bucket_arn],
            },
            {
                "Sid": "ListOwnPrefix",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [bucket_arn],
                "Condition": {"StringLike": {"s3:prefix": [f"{scoped}*"]}},
            },
            {
                "Sid": "OwnObjects",
                "Effect": "Allow",
                "Action": ["s3:GetObject"] if read_only else [
                    "s3:AbortMultipartUpload",
                    "s3:DeleteObject",
                    "s3:GetObject",
                    "s3:ListMultipartUploadParts",
                    "s3:PutObject",
                ],
                "Resource": [f"{bucket_arn}/{scoped}*"],
            },
        ],
    }


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple, set)):
        return tuple(sorted(str(v) for v in value))
    return (str(value),)


def _canonical_statement(statement: Any) -> tuple:
    if not isinstance(statement, dict):
        return ("?", repr(statement))
    conditions = statement.get("Condition") or {}
    canonical_conditions = tuple(sorted(
        (op, tuple(sorted((key, _strings(values)) for key, values in (keys or {}).items())))
        for op, keys in conditions.items()
    )) if isinstance(conditions, dict) else (("?", repr(conditions)),)
    # Sid is a label: it grants nothing, so it does not make two documents differ.
    return (
        str(statement.get("Effect", "")),
        _strings(statement.get("Action")),
        _strings(statement.get("NotAction")),
        _strings(statement.get("Resource")),
        _strings(statement.get("NotResource")),
        canonical_conditions,
    )


def same_policy(a: Any, b: Any) -> bool:
    """Do two policy documents grant the same? Order of statements, actions and resources and
    the statements' Sids do not matter; MinIO may hand a document back reordered."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False

    def canonical(doc: dict) -> tuple:
        statements = doc.get("Statement") or []
        if isinstance(statements, dict):
            statements = [statements]
        return (str(doc.get("Version", "")), tuple(sorted(_canonical_statement(s) for s in statements)))

    return canonical(a) == canonical(b)


# ----------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class UserState:
    enabled: bool
    policies: tuple[str, ...] = ()  # attached canned policies
    groups: tuple[str, ...] = ()  # group memberships (their policies apply as well)


@dataclass(frozen=True)
class AccessState:
    """What the server has for one grant, as read through the admin API."""

    policy: dict[str, Any] | None  # the policy document under the grant's name; None: no such policy
    user: UserState | None  # None: no such user
    secret_matches: bool = False  # a request signed with the cluster's secret was accepted


@dataclass(frozen=True)
class AccessPlan:
    policy: str | None = None  # "create" | "update"
    user: str | None = None  # "create" | "reset secret"
    detach: tuple[str, ...] = ()
    attach: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def is_noop(self) -> bool:
        return not (self.policy or self.user or self.detach or self.attach)


def parse_user_info(text: str) -> UserState:
    """MinIO's user-info answer (madmin.UserInfo: policyName is comma-separated, status)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        raise MinioAdminError("user info: the admin API answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise MinioAdminError("user info: the admin API answered with JSON that is not an object")
    policies = tuple(p.strip() for p in str(data.get("policyName") or "").split(",") if p.strip())
    groups = tuple(str(g) for g in (data.get("memberOf") or []))
    return UserState(enabled=data.get("status") == "enabled", policies=policies, groups=groups)


def parse_policy(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        raise MinioAdminError("policy info: the admin API answered with something that is not JSON") from None
    if not isinstance(data, dict):
        raise MinioAdminError("policy info: the admin API answered with JSON that is not an object")
    # `?v=2` answers wrap the document ({"PolicyName", "Policy", …}); the classic answer is the document.
    inner = data.get("Policy")
    return inner if isinstance(inner, dict) else data


def plan_access(state: AccessState, grant: ClusterGrant, access_key_id: str) -> AccessPlan:
    """What to change so that the user has exactly the grant's policy, under the secret we hold."""
    wanted = grant.policy()
    if state.policy is None:
        policy_action: str | None = "create"
    elif not same_policy(state.policy, wanted):
        policy_action = "update"
    else:
        policy_action = None

    if state.user is None:
        user_action: str | None = "create"
        attached: tuple[str, ...] = ()
        groups: tuple[str, ...] = ()
    else:
        if not state.user.enabled:
            raise ClusterUserDisabled(
                f"MinIO user {access_key_id} of cluster {grant.cluster} is disabled; re-enabling it is an operator's "
                "decision (`mc admin user enable`), or register a new key for the cluster"
            )
        user_action = None if state.secret_matches else "reset secret"
        attached = state.user.policies
        groups = state.user.groups

    # The cluster's key gets exactly its own policy: anything else attached (say `readwrite`)
    # would widen it to every bucket, since MinIO grants the union of a user's policies.
    detach = tuple(sorted(p for p in set(attached) if p != grant.policy_name))
    attach = () if grant.policy_name in attached else (grant.policy_name,)
    return AccessPlan(policy=policy_action, user=user_action, detach=detach, attach=attach, groups=groups)


def describe(plan: AccessPlan, grant: ClusterGrant, access_key_id: str) -> str:
    """The step's one sentence (no secrets: access key ids are names, not credentials)."""
    scope = f"{grant.bucket}/{scoped_prefix(grant.prefix)}" + (", read-only" if grant.read_only else "")
    if plan.is_noop:
        sentence = (f"MinIO user {access_key_id} and policy {grant.policy_name} (only {scope}) already as wanted; "
                    "nothing changed.")
    else:
        done = []
        if plan.policy:
            done.append(f"{'created' if plan.policy == 'create' else 'updated'} policy {grant.policy_name} (only {scope})")
        if plan.user == "create":
            done.append(f"created user {access_key_id}")
        elif plan.user == "reset secret":
            done.append(f"set user {access_key_id}'s secret to the registered one")
        if plan.detach:
            done.append(f"detached {', '.join(plan.detach)}")
        if plan.attach:
            done.append(f"attached {', '.join(plan.attach)}")
        sentence = "MinIO: " + "; ".join(done) + "."
    if plan.groups:
        sentence += f" Note: the user is also in group(s) {', '.join(plan.groups)}, whose policies apply too."
    return sentence


@dataclass(frozen=True)
class AccessOutcome:
    plan: AccessPlan
    sentence: str

    @property
    def changed(self) -> bool:
        return not self.plan.is_noop


# ----------------------------------------------------------------------------- the client (thin)


class AdminApi(Protocol):
    """The part of minio-py's `MinioAdmin` (>= 7.2.17) this module uses."""

    def user_info(self, access_key: str) -> str: ...

    def user_add(self, access_key: str, secret_key: str) -> str: ...

    def policy_info(self, policy_name: str) -> str: ...

    def policy_add(self, policy_name: str, policy_file: Any = None, policy: dict | None = None) -> str: ...

    def attach_policy(self, policies: list[str], user: str | None = None, group: str | None = None) -> str: ...

    def detach_policy(self, policies: list[str], user: str | None = None, group: str | None = None) -> str: ...


def tls_context(ca_pem: str) -> ssl.SSLContext:
    """Trust exactly the site's CA (not the system store), verify the chain and the host name."""
    if not ca_pem or "-----BEGIN CERTIFICATE-----" not in ca_pem:
        # An empty cadata would make Python fall back to the system's CAs: refuse instead.
        raise MinioAccessSpecError("object store CA certificate: empty or not a PEM certificate")
    try:
        context = ssl.create_default_context(cadata=ca_pem)
    except (ssl.SSLError, ValueError):
        raise MinioAccessSpecError("object store CA certificate: not a readable PEM certificate") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if context.verify_mode != ssl.CERT_REQUIRED or not context.check_hostname:  # never expected; never silently
        raise MinioAccessSpecError("object store TLS: certificate and host name verification are not both on")
    return context


def http_pool(endpoint: AdminEndpoint) -> urllib3.PoolManager:
    # Retried: only failures to connect (nothing reached the server). Not retried: TLS failures
    # (a retry cannot fix a certificate), read errors and error statuses.
    n = endpoint.connect_retries
    retries = urllib3.Retry(total=n, connect=n, read=0, other=0, status=0, redirect=0, backoff_factor=0.5)
    return urllib3.PoolManager(
        ssl_context=tls_context(endpoint.ca_pem),
        cert_reqs="CERT_REQUIRED",
        timeout=urllib3.Timeout(connect=endpoint.timeout, read=endpoint.timeout * 3),
        retries=retries,
        maxsize=2,
    )


def admin_client(endpoint: AdminEndpoint, credentials: MinioCredentials) -> AdminApi:
    """minio-py's MinioAdmin over HTTPS with our own verified pool (no `cert_check=False`)."""
    return MinioAdmin(
        endpoint=endpoint.address,
        credentials=StaticProvider(credentials.access_key_id, credentials.secret_access_key),
        region=endpoint.region,
        secure=True,
        http_client=http_pool(endpoint),
    )


def parse_admin_error(status: str, body: str) -> tuple[int, str, str]:
    """(HTTP status, MinIO code, message) from a failed admin call's status and JSON body."""
    code, message = "", ""
    try:
        data = json.loads(body) if body else {}
        if isinstance(data, dict):
            code, message = str(data.get("Code") or ""), str(data.get("Message") or "")
    except ValueError:
        message = body[:200]
    return (int(status) if str(status).isdigit() else 0), code, message


@dataclass
class _Scrubber:
    secrets: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self, text: str) -> str:
        for value in self.secrets:
            if value:
                text = text.replace(value, "***")
        return text


def _call(what: str, endpoint: AdminEndpoint, scrub: _Scrubber, fn: Callable[[], str]) -> str:
    """Run one admin call; translate every failure into the project's errors, secrets scrubbed."""
    where = f"MinIO admin API at {endpoint.address}: {what}"
    try:
        return fn()
    except MinioAdminException as exc:
        status, code, message = parse_admin_error(getattr(exc, "_code", ""), getattr(exc, "_body", ""))
        text = scrub(f"{where}: HTTP {status} {code or 'error'}: {message}".rstrip(": "))
        if status >= 500 or status == 0:
            raise MinioAdminUnavailable(text) from None
        raise MinioAdminError(text, status=status, code=code) from None
    except urllib3.exceptions.MaxRetryError as exc:
        reason = exc.reason
        if isinstance(reason, urllib3.exceptions.SSLError):
            raise MinioAdminError(scrub(f"{where}: TLS verification failed: {reason}")) from None
        raise MinioAdminUnavailable(scrub(f"{where}: {type(reason).__name__}: {reason}")) from None
    except urllib3.exceptions.SSLError as exc:
        raise MinioAdminError(scrub(f"{where}: TLS verification failed: {exc}")) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise MinioAdminUnavailable(scrub(f"{where}: {type(exc).__name__}: {exc}")) from None
    except ValueError as exc:  # minio-py's own checks (e.g. decrypting an answer)
        raise MinioAdminError(scrub(f"{where}: {exc}")) from None


def read_state(admin: AdminApi, probe: AdminApi, grant: ClusterGrant, cluster: MinioCredentials,
               endpoint: AdminEndpoint, scrub: _Scrubber) -> AccessState:
    try:
        policy: dict[str, Any] | None = parse_policy(
            _call(f"policy info {grant.policy_name}", endpoint, scrub, lambda: admin.policy_info(grant.policy_name)))
    except MinioAdminError as exc:
        if exc.code != NO_SUCH_POLICY:
            raise
        policy = None
    key = cluster.access_key_id
    try:
        user: UserState | None = parse_user_info(_call(f"user info {key}", endpoint, scrub, lambda: admin.user_info(key)))
    except MinioAdminError as exc:
        if exc.code != NO_SUCH_USER:
            raise
        user = None
    secret_matches = False
    if user is not None and user.enabled:
        # A user may read its own info (MinIO: GetUserInfo with DenyOnly for self), so a request
        # signed with the registered secret succeeds exactly when the server holds that secret.
        try:
            _call(f"user info {key} as {key}", endpoint, scrub, lambda: probe.user_info(key))
            secret_matches = True
        except MinioAdminError as exc:
            if exc.code == "AccessDenied":
                secret_matches = True  # authenticated, then denied by an explicit Deny: the secret is right
            elif exc.code not in _WRONG_KEY:
                raise
    return AccessState(policy=policy, user=user, secret_matches=secret_matches)


def apply_plan(plan: AccessPlan, admin: AdminApi, grant: ClusterGrant, cluster: MinioCredentials,
               endpoint: AdminEndpoint, scrub: _Scrubber) -> None:
    key = cluster.access_key_id
    if plan.policy:
        document = grant.policy()
        _call(f"add policy {grant.policy_name}", endpoint, scrub,
              lambda: admin.policy_add(grant.policy_name, policy=document))
    if plan.user:
        secret = cluster.secret_access_key
        # The body is encrypted with the admin secret by minio-py; the secret is never in the URL.
        _call(f"add user {key}", endpoint, scrub, lambda: admin.user_add(key, secret))
    if plan.detach:
        _tolerate_applied(lambda: _call(f"detach {', '.join(plan.detach)} from {key}", endpoint, scrub,
                                        lambda: admin.detach_policy(list(plan.detach), user=key)))
    if plan.attach:
        _tolerate_applied(lambda: _call(f"attach {', '.join(plan.attach)} to {key}", endpoint, scrub,
                                        lambda: admin.attach_policy(list(plan.attach), user=key)))


def _tolerate_applied(fn: Callable[[], str]) -> None:
    try:
        fn()
    except MinioAdminError as exc:
        if exc.code != ALREADY_APPLIED:  # a concurrent run did it first: the state is as wanted
            raise


def ensure_cluster_access(
    endpoint: AdminEndpoint,
    admin: MinioCredentials,
    cluster: MinioCredentials,
    grant: ClusterGrant,
    *,
    connect: Callable[[AdminEndpoint, MinioCredentials], AdminApi] = admin_client,
    other_users: tuple[str, ...] = (),
) -> AccessOutcome:
    """Make the cluster's MinIO user exist, with the registered secret and exactly its own policy.

    The same for the restore host's user, with the grant's read-only policy; `other_users` are
    access keys this user must not be (the cluster's own, whose policy it would otherwise detach).
    Idempotent: a second run reads the same state, plans nothing and says so. Order: policy
    (it must exist before it is attached), user, then detach/attach. Raises MinioAccessSpecError
    before any request when the inputs cannot work, MinioAdminUnavailable when MinIO does not
    answer, MinioAdminError (ClusterUserDisabled among them) when it refuses."""
    grant.check()
    if cluster.access_key_id == admin.access_key_id:
        raise MinioAccessSpecError("object store credentials: the cluster's access key must differ from the admin's")
    if cluster.access_key_id in other_users:
        raise MinioAccessSpecError(f"object store credentials: the {grant.access} user's access key must differ from "
                                   "the cluster's other users'")
    scrub = _Scrubber((admin.secret_access_key, cluster.secret_access_key))
    admin_api = connect(endpoint, admin)
    probe_api = connect(endpoint, cluster)
    state = read_state(admin_api, probe_api, grant, cluster, endpoint, scrub)
    plan = plan_access(state, grant, cluster.access_key_id)
    apply_plan(plan, admin_api, grant, cluster, endpoint, scrub)
    return AccessOutcome(plan=plan, sentence=describe(plan, grant, cluster.access_key_id))
