"""The object store through the S3 API (boto3), over TLS verified against the site's CA."""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from tasks.errors import BouwsteenError


class ObjectStoreUnavailable(BouwsteenError):
    """The endpoint does not answer (transient)."""


class ObjectStoreError(BouwsteenError):
    pass


@dataclass(frozen=True, repr=False)
class S3Endpoint:
    url: str  # https://address:port
    access_key_id: str
    secret_access_key: str
    ca_pem: str
    region: str = "us-east-1"

    def __repr__(self) -> str:
        return f"S3Endpoint({self.url}, key={self.access_key_id})"


class ObjectStore:
    def __init__(self, endpoint: S3Endpoint, *, timeout: float = 10):
        self.endpoint = endpoint
        fd, self._ca_file = tempfile.mkstemp(prefix="bouwsteen-ca-", suffix=".pem")
        with os.fdopen(fd, "w") as fh:
            fh.write(endpoint.ca_pem)
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint.url,
            aws_access_key_id=endpoint.access_key_id,
            aws_secret_access_key=endpoint.secret_access_key,
            region_name=endpoint.region,
            verify=self._ca_file,
            config=Config(
                connect_timeout=timeout, read_timeout=timeout * 3, retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
                # Newer boto3 streams checksummed uploads without Content-Length (aws-chunked);
                # S3-compatible servers (rclone, older MinIO) refuse that. Plain signed PUTs work everywhere.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def close(self) -> None:
        try:
            os.unlink(self._ca_file)
        except OSError:
            pass

    def __enter__(self) -> "ObjectStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn):
        try:
            return fn()
        except EndpointConnectionError as exc:
            raise ObjectStoreUnavailable(f"{self.endpoint.url}: {what}: {exc}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise ObjectStoreError(f"{self.endpoint.url}: {what}: {code}: {exc}") from None
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(f"{self.endpoint.url}: {what}: {exc}") from None

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self.client.head_bucket(Bucket=bucket)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise ObjectStoreError(f"{self.endpoint.url}: head bucket {bucket}: {exc}") from None
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise ObjectStoreUnavailable(f"{self.endpoint.url}: head bucket: {exc}") from None

    def ensure_bucket(self, bucket: str) -> bool:
        if self.bucket_exists(bucket):
            return False
        self._call("create bucket", lambda: self.client.create_bucket(Bucket=bucket))
        return True

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"{self.endpoint.url}: head {bucket}/{key}: {exc}") from None
        except (EndpointConnectionError, BotoCoreError) as exc:
            raise ObjectStoreUnavailable(f"{self.endpoint.url}: head object: {exc}") from None

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self._call("put", lambda: self.client.put_object(Bucket=bucket, Key=key, Body=body))

    def get(self, bucket: str, key: str) -> bytes:
        return self._call("get", lambda: self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def delete(self, bucket: str, key: str) -> None:
        self._call("delete", lambda: self.client.delete_object(Bucket=bucket, Key=key))

    def keys(self, bucket: str, prefix: str = "") -> dict[str, tuple[int, str]]:
        """key -> (size, etag) under a prefix (every page)."""
        found: dict[str, tuple[int, str]] = {}
        paginator = self.client.get_paginator("list_objects_v2")

        def collect() -> None:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    found[obj["Key"]] = (obj["Size"], obj.get("ETag", ""))

        self._call("list", collect)
        return found

    def round_trip(self, bucket: str, prefix: str) -> float:
        """put, get, compare, delete one object; returns seconds taken."""
        import time

        key = f"{prefix.rstrip('/')}/.bouwsteen-roundtrip-{uuid.uuid4().hex}"
        payload = os.urandom(4096)
        started = time.monotonic()
        self.put(bucket, key, payload)
        try:
            if self.get(bucket, key) != payload:
                raise ObjectStoreError(f"{self.endpoint.url}: {bucket}/{key} came back different")
        finally:
            self.delete(bucket, key)
        if self.exists(bucket, key):
            raise ObjectStoreError(f"{self.endpoint.url}: {bucket}/{key} still there after delete")
        return time.monotonic() - started
