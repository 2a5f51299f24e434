"""The S3 store (any S3-compatible endpoint: AWS, MinIO, Ceph RGW, R2).

Endpoint, region and credentials come from the standard boto3 chain only
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, config files, ...); they
are never printed or stored. Write-once objects use `If-None-Match: *`; refs
move with `If-Match: <etag>` (the version token of a ref is its ETag).
Files go through boto3's transfer manager (multipart, parallel parts) with
checksums the server verifies: a single-part upload carries the blob's own
sha256, so the server refuses bytes that do not match the name; the parts of
a multipart upload carry CRC32s (a transport check: the blob's sha256, its
name, is known before the upload and checked on every pull; CRC32 costs
client and server less than half of what a per-part SHA-256 pass would).
Retries back off on throttling and 5xx. A missing bucket is never created: it is a BadInput.

Checksums: sent unless the standard chain says `request_checksum_calculation
= when_required` (AWS_REQUEST_CHECKSUM_CALCULATION), for servers that do not
accept them; a server that refuses them once turns them off for the store.
"""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ..errors import BadInput, StepFailed
from ..hashing import HashingWriter
from .base import Store

MiB = 1024 * 1024
STREAM_CHUNK = 8 * MiB
STREAM_BUFFERS = 4  # chunks in flight between the reader (which writes them) and the hasher
STREAM_RETRIES = 5
LIST_PAGE = 1000  # keys a LIST request answers with
LIST_RANGES = 8  # ranges of one prefix listed at once (with known keys to cut at)

# an error code from a server that does not implement the checksum we sent
_CHECKSUM_REFUSED = {"NotImplemented", "InvalidArgument", "InvalidRequest", "UnsupportedChecksumAlgorithm"}
# the body does not match the checksum we sent: the source changed under us
_BAD_DIGEST = {"BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}


def _stream_errors() -> tuple:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return (BotoConnectionError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError, ProtocolError,
            ConnectionError)


try:
    _STREAM_ERRORS = _stream_errors()
except ImportError:  # botocore not installed: the S3 store cannot be used anyway
    _STREAM_ERRORS = (ConnectionError,)


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e: BaseException) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _not_found(e: BaseException) -> bool:
    return _status(e) == 404 or _code(e) in _NOT_FOUND


def _condition_failed(e: BaseException) -> bool:
    return _status(e) in (409, 412) or _code(e) in _CONDITION_FAILED


class _Body:
    """A GET response's body read into caller-owned buffers. Where botocore
    hands over a plain (not content-encoded) http.client response, its
    readinto fills the buffer from the socket directly; otherwise the body's
    own read is copied in. A body that ends before its Content-Length raises
    ConnectionError (the caller resumes from where it stopped)."""

    def __init__(self, resp: dict):
        self.body = resp["Body"]
        self.left = resp.get("ContentLength")
        raw = getattr(self.body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        plain = not (resp.get("ContentEncoding") or "").strip() or resp.get("ContentEncoding") == "identity"
        self._readinto = fp.readinto if plain and fp is not None and hasattr(fp, "readinto") else None
        self._raw = raw

    def readinto(self, buf: bytearray) -> int:
        if self._readinto is not None:
            n = self._readinto(buf)
        else:
            data = self.body.read(len(buf))
            n = len(data)
            buf[:n] = data
        if self.left is not None:
            if not n and self.left > 0:
                raise ConnectionError(f"the response ended {self.left} bytes early")
            self.left -= n
        return n

    def __enter__(self) -> "_Body":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and self._readinto is not None and self.left == 0 and hasattr(self._raw, "release_conn"):
            self._raw.release_conn()  # read to its end: the connection goes back to the pool
        else:
            self.body.close()


class S3Store(Store):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        download_threshold: Optional[int] = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        prefix = "/".join(p for p in prefix.split("/") if p)
        self.prefix = prefix + "/" if prefix else ""
        self.uri = f"s3://{bucket}/{prefix}".rstrip("/")
        cfg = Config(
            retries={"mode": "standard", "max_attempts": 8},
            max_pool_connections=max(32, 2 * max_concurrency),
            connect_timeout=10,
            read_timeout=120,
            # every blob's sha256 is checked by the store itself as it arrives;
            # botocore's own pass over the same bytes would only repeat it
            response_checksum_validation="when_required",
        )
        self._cfg = cfg
        self._checksums = getattr(boto3.client("s3", config=cfg).meta.config, "request_checksum_calculation",
                                  None) != "when_required"
        self.s3 = self._client()
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        # objects at least this big are fetched in parallel ranged parts;
        # smaller ones (and all, when 0) in one stream each
        self.download_threshold = multipart_threshold if download_threshold is None else download_threshold
        self._bucket_ok = False
        self._bucket_lock = threading.Lock()

    # ------------------------------------------------------------ helpers

    def _client(self):
        """The boto3 client. While every write carries a SHA-256 checksum that
        the server verifies, the body is not also hashed for the signature
        (what botocore already does over https; over plain http it would hash
        every byte once more)."""
        import boto3
        from botocore.config import Config

        cfg = self._cfg.merge(Config(s3={"payload_signing_enabled": False})) if self._checksums else self._cfg
        return boto3.client("s3", config=cfg)

    def _no_checksums(self) -> None:
        """The server refused checksums: stop sending them, and sign bodies again."""
        self._checksums = False
        self.s3 = self._client()

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _check_bucket(self) -> None:
        """Once per store: the bucket exists and we may use it, else BadInput."""
        if self._bucket_ok:
            return
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        with self._bucket_lock:
            if self._bucket_ok:
                return
            try:
                self.s3.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _status(e) in (301, 400, 403, 404) or _code(e) in ("404", "NoSuchBucket", "403", "AccessDenied"):
                    raise BadInput(
                        f"store {self.uri}: bucket {self.bucket!r} does not exist or is not accessible "
                        f"(HTTP {_status(e) or _code(e)}); create it first"
                    ) from None
                raise
            except NoCredentialsError:
                raise BadInput(f"store {self.uri}: no AWS credentials found (configure the standard boto3 chain)") from None
            except EndpointConnectionError as e:
                raise BadInput(f"store {self.uri}: cannot reach the S3 endpoint ({e})") from None
            self._bucket_ok = True

    def _put_object(self, key: str, data: bytes, **conditions: Any) -> None:
        """put_object with a SHA-256 checksum where the server accepts one."""
        from botocore.exceptions import ClientError

        self._check_bucket()
        args = dict(Bucket=self.bucket, Key=self._k(key), Body=data, **conditions)
        if self._checksums:
            try:
                self.s3.put_object(**args, ChecksumAlgorithm="SHA256")
                return
            except ClientError as e:
                if _code(e) not in _CHECKSUM_REFUSED:
                    raise
                self._no_checksums()  # this server does not take them
        self.s3.put_object(**args)

    # ------------------------------------------------------------ primitives

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if _not_found(e):
                return False
            raise

    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._put_object(key, data, **({"IfNoneMatch": "*"} if if_none_match else {}))
            return True
        except ClientError as e:
            if if_none_match and _condition_failed(e):
                return False
            raise

    def _put_file(self, key: str, path: Path, digest: str, size: int) -> None:
        from boto3.exceptions import S3UploadFailedError

        self._check_bucket()
        extra: dict[str, Any] = {"Metadata": {"sha256": digest}}
        if self._checksums:
            if size < self.transfer.multipart_threshold:
                # one PUT: the server checks the whole body against the name
                extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(digest)).decode()
            else:
                extra["ChecksumAlgorithm"] = "CRC32"  # per part, computed as it is read
        try:
            self.s3.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer, ExtraArgs=extra)
        except S3UploadFailedError as e:
            cause = e.__cause__ or e.__context__
            if _code(cause) in _BAD_DIGEST:
                raise StepFailed(f"{path} changed while it was stored as sha256:{digest}; nothing was stored") from None
            if self._checksums and _code(cause) in _CHECKSUM_REFUSED:
                self._no_checksums()
                extra = {"Metadata": {"sha256": digest}}
                self.s3.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer, ExtraArgs=extra)
                return
            raise

    def _get_bytes(self, key: str) -> Optional[bytes]:
        got = self._get_with_version(key)
        return None if got is None else got[0]

    def _get_file(self, key: str, dest: Path, size: Optional[int] = None) -> Optional[tuple[str, int]]:
        """A big object: the transfer manager fetches its parts in parallel
        (ranged GETs) and, given a non-seekable target, hands them over in
        order, so each byte is hashed as it is written. A small one (or every
        one, with download_threshold 0): one GET, read while a second thread
        hashes and writes. One pass either way, no re-read to verify."""
        from botocore.exceptions import ClientError

        self._check_bucket()
        if size is None or not self.download_threshold or size < self.download_threshold:
            return self._get_stream(key, dest)
        try:
            with open(dest, "wb") as f:
                w = HashingWriter(f)
                self.s3.download_fileobj(self.bucket, self._k(key), w, Config=self.transfer)
            return w.result()
        except ClientError as e:
            if _not_found(e):
                return None
            raise

    def _get_stream(self, key: str, dest: Path) -> Optional[tuple[str, int]]:
        """One GET streamed into dest. The reader fills a few reused buffers
        straight from the socket and writes each to dest (what a plain
        download does); a second thread hashes the buffers, in order, while
        the next one arrives, so the check costs no time on the stream. A
        stream that breaks is resumed where it stopped (a ranged GET), with
        backoff, up to STREAM_RETRIES times."""
        import hashlib
        import queue
        import random
        import time

        from botocore.exceptions import ClientError

        free: "queue.Queue[bytearray]" = queue.Queue()
        for _ in range(STREAM_BUFFERS):
            free.put(bytearray(STREAM_CHUNK))
        written: "queue.Queue[Optional[tuple[bytearray, int]]]" = queue.Queue()
        h = hashlib.sha256()

        def hasher() -> None:
            while (item := written.get()) is not None:
                buf, n = item
                with memoryview(buf) as mv:
                    h.update(mv[:n])
                free.put(buf)

        t = threading.Thread(target=hasher, name="enginefarm-s3-hash", daemon=True)
        t.start()
        offset, tries = 0, 0
        try:
            with open(dest, "wb") as f:
                while True:
                    try:
                        extra = {"Range": f"bytes={offset}-"} if offset else {}
                        resp = self.s3.get_object(Bucket=self.bucket, Key=self._k(key), **extra)
                        with _Body(resp) as body:
                            while True:
                                buf = free.get()
                                try:
                                    n = body.readinto(buf)
                                    if n:
                                        with memoryview(buf) as mv:
                                            f.write(mv[:n])
                                except BaseException:
                                    free.put(buf)  # a broken stream gives its buffer back for the resume
                                    raise
                                if not n:
                                    free.put(buf)
                                    break
                                written.put((buf, n))
                                offset += n
                        break
                    except ClientError as e:
                        if _not_found(e):
                            return None
                        raise
                    except _STREAM_ERRORS:
                        tries += 1
                        if tries > STREAM_RETRIES:
                            raise
                        time.sleep(random.random() * min(0.2 * 2 ** tries, 5.0))
        finally:
            written.put(None)
            t.join()
        return h.hexdigest(), offset

    def _list(self, prefix: str) -> list[str]:
        self._check_bucket()
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._k(prefix)):
            for o in page.get("Contents", []):
                out.append(o["Key"][len(self.prefix):])
        return out

    def _list_versions(self, prefix: str, known: Optional[list[str]] = None) -> dict[str, Optional[str]]:
        """The ETags of one listing (1,000 keys a request). A LIST page is one
        request after another; with `known` keys (sorted) the key space is cut
        at every LIST_PAGE-th of them and the ranges are listed at once, each
        from its lower bound (StartAfter) until it passes its upper one: the
        same keys, in about one round trip per range instead of one per page
        in turn. Keys added or removed since `known` only move where a range
        ends; every key falls in exactly one range."""
        self._check_bucket()
        bounds = list(known or [])[LIST_PAGE - 1::LIST_PAGE]
        if not bounds:
            return self._list_range(prefix, None, None)
        ranges = list(zip([None] + bounds, bounds + [None]))
        out: dict[str, Optional[str]] = {}
        with ThreadPoolExecutor(max_workers=min(LIST_RANGES, len(ranges))) as pool:
            for part in pool.map(lambda r: self._list_range(prefix, *r), ranges):
                out.update(part)
        return out

    def _list_range(self, prefix: str, after: Optional[str], upto: Optional[str]) -> dict[str, Optional[str]]:
        """{key: ETag} of the keys under prefix in (after, upto] (None: unbounded)."""
        kw = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        if after is not None:
            kw["StartAfter"] = self._k(after)
        out: dict[str, Optional[str]] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(**kw):
            for o in page.get("Contents", []):
                key = o["Key"][len(self.prefix):]
                if upto is not None and key > upto:
                    return out
                out[key] = o.get("ETag")
        return out

    def _token_matches(self, token: Optional[str], data: bytes) -> bool:
        """The ETag of a single-part upload is the MD5 of its bytes (a
        multipart one has a '-N' suffix: cannot tell)."""
        import hashlib

        t = (token or "").strip('"')
        return len(t) == 32 and "-" not in t and hashlib.md5(data, usedforsecurity=False).hexdigest() == t

    def _get_with_version(self, key: str) -> Optional[tuple[bytes, str]]:
        from botocore.exceptions import ClientError

        self._check_bucket()
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if _not_found(e):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._put_object(key, data, **({"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}))
            return True
        except ClientError as e:
            # 412: the condition failed; 409: a concurrent conditional write
            # won; 404 (If-Match): the ref was deleted meanwhile
            if _condition_failed(e) or (expected is not None and _not_found(e)):
                return False
            raise

    def _delete(self, key: str) -> None:
        self._check_bucket()
        self.s3.delete_object(Bucket=self.bucket, Key=self._k(key))

    def _sweep_partials(self, max_age: float) -> int:
        """Abort multipart uploads under the prefix that killed writers left."""
        from datetime import datetime, timedelta, timezone

        self._check_bucket()
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=max_age)
        n = 0
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for u in page.get("Uploads", []):
                if u["Initiated"] < cutoff:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    n += 1
        return n
