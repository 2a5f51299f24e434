"""The S3 store (any S3-compatible endpoint: AWS, MinIO, Ceph RGW, R2).

Endpoint and credentials come from the standard boto3 chain only
(`AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...); they are never printed or stored.
Write-once objects use `If-None-Match: *`; refs move with `If-Match: <etag>`.
Files go through boto3's transfer manager (multipart, parallel parts) with
SHA-256 checksums; retries with backoff on throttling and 5xx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import BadInput
from .base import Store

MB = 1024 * 1024


def _code(e) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = ""):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        cfg = Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=32,
                     request_checksum_calculation="when_supported", response_checksum_validation="when_supported")
        self.s3 = boto3.client("s3", config=cfg)
        self.transfer = TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=16 * MB, max_concurrency=8)
        self._checked = False

    def _check_bucket(self) -> None:
        if self._checked:
            return
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _status(e) in (404, 403) or _code(e) in ("404", "NoSuchBucket", "403"):
                raise BadInput(f"store {self.uri}: bucket {self.bucket!r} does not exist or is not accessible") from None
            raise
        except NoCredentialsError:
            raise BadInput(f"store {self.uri}: no AWS credentials found (configure the standard boto3 chain)") from None
        except EndpointConnectionError as e:
            raise BadInput(f"store {self.uri}: cannot reach the S3 endpoint ({e})") from None
        self._checked = True

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _head(self, key: str) -> Optional[dict]:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _status(e) == 404 or _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        from botocore.exceptions import ClientError

        self._check_bucket()
        kw = {"IfNoneMatch": "*"} if if_none_match else {}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, ChecksumAlgorithm="SHA256", **kw)
            return True
        except ClientError as e:
            if if_none_match and (_status(e) in (409, 412) or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict")):
                return False
            raise

    def _put_blob_from(self, key: str, path: Path, digest: str) -> None:
        self._check_bucket()
        self.s3.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer,
                            ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}})

    def _get_bytes(self, key: str) -> Optional[bytes]:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def _download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            self.s3.download_file(self.bucket, self._k(key), str(dest), Config=self.transfer)
        except ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from None
            raise

    def _list(self, prefix: str) -> list[str]:
        self._check_bucket()
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            for o in page.get("Contents", []):
                out.append(o["Key"][len(self.prefix):])
        return out

    def _get_versioned(self, key: str) -> Optional[tuple[bytes, str]]:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "404"):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        from botocore.exceptions import ClientError

        self._check_bucket()
        kw = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **kw)
            return True
        except ClientError as e:
            if _status(e) in (409, 412) or _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise

    def _delete(self, key: str) -> None:
        self._check_bucket()
        self.s3.delete_object(Bucket=self.bucket, Key=self._k(key))
