"""The store: one interface (`base.Store`), two implementations (a local
directory, `local.LocalStore`, and S3, `s3.S3Store`).

    open_store()                      $ENGINEFARM_STORE, else ./.farm
    open_store("/srv/farm")           a directory (created on first write)
    open_store("file:///srv/farm")    the same, as a URI
    open_store("s3://bucket/prefix")  S3; endpoint and credentials from the
                                      standard boto3 chain only

S3 transfer settings, from the environment (defaults in brackets):
    ENGINEFARM_S3_PART_MB        part size of multipart uploads and ranged GETs [16]
    ENGINEFARM_S3_MULTIPART_MB   files at least this big go up in parallel parts [64]
    ENGINEFARM_S3_RANGED_GET_MB  objects at least this big come down in parallel
                                 ranged GETs; 0: one stream per object [64]
    ENGINEFARM_S3_CONCURRENCY    parts in flight per file [8]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from ..errors import BadInput
from .base import CorruptBlob, MissingBlob, Store

__all__ = ["open_store", "Store", "CorruptBlob", "MissingBlob"]

DEFAULT = ".farm"
# S3 bucket naming rules (general purpose buckets)
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_PART = re.compile(r"^[A-Za-z0-9._=+-]+$")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)


def _shown(uri: str) -> str:
    """The URI for a message, with any user:password@ part masked."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def open_store(uri: Optional[str] = None) -> Store:
    """Open a store: a directory path, file:///abs/path or s3://bucket/prefix.

    None (or "") means $ENGINEFARM_STORE, else `.farm` in the current
    directory. Nothing is contacted or created here; a bad URI is a BadInput.
    """
    if uri is None or uri == "":
        uri = os.environ.get("ENGINEFARM_STORE") or DEFAULT
    if not isinstance(uri, str):
        raise BadInput(f"bad store {uri!r}: expected a directory, file:///path or s3://bucket/prefix")
    m = SCHEME.match(uri)
    if m is None:
        if re.match(r"^(s3|file):", uri, re.I):
            raise BadInput(f"bad store {_shown(uri)!r}: expected s3://bucket/prefix or file:///abs/path")
        return _local(uri, uri)
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "s3":
        return _s3(uri, rest)
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise BadInput(f"bad store {_shown(uri)!r}: a file URI needs an absolute path (file:///abs/path)")
        return _local(uri, unquote("/" + path))
    raise BadInput(
        f"bad store {_shown(uri)!r}: unsupported scheme {scheme + '://'!r}; "
        "use a directory, file:///abs/path or s3://bucket/prefix"
    )


def _local(uri: str, path: str) -> Store:
    from .local import LocalStore

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput(f"bad store {_shown(uri)!r}: {p} exists and is not a directory")
    return LocalStore(p)


def _s3(uri: str, rest: str) -> Store:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise BadInput(f"bad store {_shown(uri)!r}: no bucket (expected s3://bucket/prefix)")
    if "@" in bucket or ":" in bucket:
        raise BadInput(
            f"bad store {_shown(uri)!r}: credentials or endpoints do not belong in the URI; "
            "use the standard AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
        )
    if not BUCKET.fullmatch(bucket) or ".." in bucket:
        raise BadInput(
            f"bad store {_shown(uri)!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lower-case letters, digits, '.', '-')"
        )
    for part in (p for p in prefix.split("/") if p):
        if part in (".", "..") or not PREFIX_PART.fullmatch(part):
            raise BadInput(
                f"bad store {_shown(uri)!r}: prefix component {part!r} is not allowed "
                "(letters, digits, '.', '_', '-', '=', '+'; no '.' or '..')"
            )
    from .s3 import MiB, S3Store

    return S3Store(bucket, prefix, **{arg: _env_int(env) * (MiB if env.endswith("_MB") else 1)
                                      for arg, env in S3_TUNING.items() if os.environ.get(env, "") != ""})


# transfer settings of the S3 store, from the environment (sizes in MiB)
S3_TUNING = {
    "multipart_chunksize": "ENGINEFARM_S3_PART_MB",
    "multipart_threshold": "ENGINEFARM_S3_MULTIPART_MB",
    "download_threshold": "ENGINEFARM_S3_RANGED_GET_MB",
    "max_concurrency": "ENGINEFARM_S3_CONCURRENCY",
}


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    low = 0 if name == "ENGINEFARM_S3_RANGED_GET_MB" else (5 if name.endswith("_MB") else 1)
    if value < low:
        raise BadInput(f"bad ${name} {raw!r}: expected a whole number >= {low}")
    return value
