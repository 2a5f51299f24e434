"""The store: one interface (`base.Store`), a local directory and S3."""

from __future__ import annotations

import os
import re
from typing import Optional

from ..errors import BadInput
from .base import CorruptBlob, Store

__all__ = ["open_store", "Store", "CorruptBlob"]

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def open_store(uri: Optional[str] = None) -> Store:
    """A directory, file:///path, or s3://bucket/prefix; default $ENGINEFARM_STORE or .farm."""
    uri = uri or os.environ.get("ENGINEFARM_STORE") or ".farm"
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if not BUCKET.match(bucket):
            raise BadInput(f"bad store {uri!r}: expected s3://bucket/prefix with a valid bucket name")
        if ".." in prefix.split("/"):
            raise BadInput(f"bad store {uri!r}: '..' in the prefix")
        from .s3 import S3Store

        return S3Store(bucket, prefix)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
        if not uri.startswith("/"):
            raise BadInput(f"bad store file://{uri}: a file URI needs an absolute path (file:///abs/path)")
    elif "://" in uri:
        raise BadInput(f"bad store {uri!r}: use a directory, file:///path or s3://bucket/prefix")
    from .local import LocalStore

    if os.path.exists(uri) and not os.path.isdir(uri):
        raise BadInput(f"bad store {uri!r}: exists and is not a directory")
    return LocalStore(uri)
