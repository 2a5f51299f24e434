"""The store interface: blobs by sha256, write-once manifests, refs moved by
compare-and-swap.

Layout, relative to the store root (a directory, or s3://bucket/prefix):

    blobs/sha256/ab/abcdef...                      immutable, written once
    manifests/<recipe>/<step>/<key>.json           immutable canonical JSON
    refs/<recipe>/<variant>/<alias>                mutable JSON, moved by CAS
    refs/<recipe>/<variant>/<alias>.history.jsonl  one line per move (best effort)
    reports/<kind>/<name>.json                     write-once run records (the nightly's)

Every rule lives here: name safety, key building, hashing, verification,
atomic pulls, JSON encoding, write-once and CAS semantics. An implementation
provides only the byte-level primitives declared abstract below (plus,
optionally, `_stage_file`), and never sees a key that was not built here from
checked names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import BadInput, StepFailed
from ..hashing import canonical_json, digest_bytes, digest_file

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HISTORY_SUFFIX = ".history.jsonl"
HISTORY_TRIES = 8


class CorruptBlob(StepFailed):
    """A blob's bytes do not hash to its name (or have the wrong size)."""


class MissingBlob(StepFailed):
    """A blob that a manifest names is not in the store."""


# ---------------------------------------------------------------------- names


def check_name(kind: str, value: Any) -> str:
    """A recipe/step/key/variant/alias: one safe path component, or BadInput."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise BadInput(
            f"bad {kind} {value!r}: use 1-128 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return value


def check_digest(value: Any) -> str:
    """A sha256 digest: 64 lower-case hex digits, or BadInput."""
    if not isinstance(value, str) or not HEX64.match(value):
        raise BadInput(f"bad sha256 digest {value!r}: expected 64 lower-case hex digits")
    return value


def check_alias(value: Any) -> str:
    check_name("alias", value)
    if value.endswith(HISTORY_SUFFIX):
        raise BadInput(f"bad alias {value!r}: names ending in {HISTORY_SUFFIX!r} are reserved for ref history")
    return value


def blob_key(digest: str) -> str:
    check_digest(digest)
    return f"blobs/sha256/{digest[:2]}/{digest}"


def manifest_key(recipe: str, step: str, key: str) -> str:
    return f"manifests/{check_name('recipe', recipe)}/{check_name('step', step)}/{check_name('key', key)}.json"


def report_key(kind: str, name: str) -> str:
    return f"reports/{check_name('report kind', kind)}/{check_name('report', name)}.json"


def ref_key(recipe: str, variant: str, alias: str) -> str:
    return f"refs/{check_name('recipe', recipe)}/{check_name('variant', variant)}/{check_alias(alias)}"


def _is_name(s: str) -> bool:
    return bool(NAME.match(s)) and ".." not in s


# ---------------------------------------------------------------------- encoding


def encode_ref(value: dict) -> bytes:
    """A ref's stored bytes: sorted, readable JSON (its version is derived from them)."""
    return (json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True, default=str) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Staged:
    """A file ready to be stored: where to read it from, its digest and size."""

    path: Path
    digest: str
    size: int


# ---------------------------------------------------------------------- the interface


class Store(ABC):
    """A content-addressed store. `uri` is a display form (never credentials)."""

    uri: str = ""

    # ------------------------------------------------------------ primitives
    # Keys are '/'-separated, relative to the store root, built only by this
    # class from checked names.

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """Whether an object is at key."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        """Write data at key, atomically. With if_none_match, only if nothing is
        there yet: False (and nothing written) when something was."""

    @abstractmethod
    def _put_file(self, key: str, path: Path, digest: str, size: int) -> None:
        """Store the file at path (whose sha256 and size are given) at key, which
        was absent a moment ago. Must never leave a partial object at key."""

    @abstractmethod
    def _get_bytes(self, key: str) -> Optional[bytes]:
        """The object's bytes, or None if absent."""

    @abstractmethod
    def _get_file(self, key: str, dest: Path) -> bool:
        """Copy the object at key over the existing file dest (a private temp
        file); False if there is no object at key."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every key under prefix (recursively), in any order."""

    @abstractmethod
    def _get_with_version(self, key: str) -> Optional[tuple[bytes, str]]:
        """(bytes, version token) of the object at key, or None if absent. The
        token changes whenever the bytes do."""

    @abstractmethod
    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        """Write data at key only if its current version is `expected`
        (None: only if absent). False when the condition does not hold."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove the object at key (no error if absent)."""

    @contextmanager
    def _stage_file(self, path: Path) -> Iterator[Staged]:
        """Hash a source file before it is stored. The default reads it in
        place; a store may override this to copy while hashing (reading the
        source once) and yield its own private copy instead."""
        digest, size = digest_file(path)
        yield Staged(path, digest, size)

    # ------------------------------------------------------------ blobs

    @staticmethod
    def blob_key(digest: str) -> str:
        """The relative key of a blob (checks the digest)."""
        return blob_key(digest)

    def has_blob(self, digest: str) -> bool:
        return self._exists(blob_key(digest))

    def put_blob_file(self, path) -> tuple[str, int]:
        """Store a file as a blob: (sha256, size). An existing blob is never
        written again."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"cannot store {path}: not a file")
        with self._stage_file(path) as staged:
            key = blob_key(staged.digest)
            if not self._exists(key):
                self._put_file(key, staged.path, staged.digest, staged.size)
        return staged.digest, staged.size

    def put_blob_bytes(self, data: bytes) -> str:
        """Store bytes as a blob; returns the sha256. Never rewrites a blob."""
        digest = digest_bytes(data)
        key = blob_key(digest)
        if not self._exists(key):
            self._put_bytes(key, bytes(data), if_none_match=True)
        return digest

    def get_blob_file(self, digest: str, dest, size: Optional[int] = None) -> None:
        """Fetch a blob into dest atomically (a temp file in dest's directory,
        then os.replace), verified against its sha256 (and size, if given)
        before it appears. On any failure nothing is left at dest or beside it."""
        key = blob_key(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            if not self._get_file(key, tmp):
                raise MissingBlob(f"blob sha256:{digest} is missing from {self.uri}")
            self._verify_file(digest, tmp, size)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_blob(self, digest: str) -> bytes:
        """A blob's bytes, verified."""
        data = self._get_bytes(blob_key(digest))
        if data is None:
            raise MissingBlob(f"blob sha256:{digest} is missing from {self.uri}")
        got = digest_bytes(data)
        if got != digest:
            raise CorruptBlob(f"blob sha256:{digest} in {self.uri} is corrupt (its bytes hash to {got})")
        return data

    def list_blobs(self) -> list[str]:
        out = []
        for k in self._list("blobs/sha256/"):
            parts = k.split("/")
            if len(parts) == 4 and HEX64.match(parts[3]) and parts[2] == parts[3][:2]:
                out.append(parts[3])
        return sorted(out)

    def delete_blob(self, digest: str) -> None:
        self._delete(blob_key(digest))

    def _verify_file(self, digest: str, path: Path, size: Optional[int]) -> None:
        got, n = digest_file(path)
        if got != digest or (size is not None and n != size):
            want = f", expected {size} bytes" if size is not None else ""
            raise CorruptBlob(
                f"blob sha256:{digest} in {self.uri} is corrupt (its bytes hash to {got}, {n} bytes{want})"
            )

    # ------------------------------------------------------------ manifests

    @staticmethod
    def manifest_path(recipe: str, step: str, key: str) -> str:
        """manifests/<recipe>/<step>/<key>.json (what refs point at)."""
        return manifest_key(recipe, step, key)

    def put_manifest(self, recipe: str, step: str, key: str, manifest: dict) -> str:
        """Write once. Returns the sha256 of the stored bytes; if a manifest is
        already there it stays, and its digest is returned."""
        if not isinstance(manifest, dict):
            raise BadInput(f"a manifest must be a JSON object, not {type(manifest).__name__}")
        path = manifest_key(recipe, step, key)
        data = canonical_json(manifest)
        for attempt in range(5):
            if self._put_bytes(path, data, if_none_match=True):
                return digest_bytes(data)
            existing = self._get_bytes(path)
            if existing is not None:
                return digest_bytes(existing)
            time.sleep(0.05 * (attempt + 1))  # a concurrent create is still landing
        raise StepFailed(f"manifest {path} in {self.uri}: could not write it, nor read what is there")

    def get_manifest(self, recipe: str, step: str, key: str) -> Optional[dict]:
        path = manifest_key(recipe, step, key)
        data = self._get_bytes(path)
        return None if data is None else self._decode(path, data)

    def get_manifest_by_path(self, path: str) -> Optional[dict]:
        """A manifest by its relative key manifests/<recipe>/<step>/<key>.json."""
        parts = path.split("/") if isinstance(path, str) else []
        if len(parts) != 4 or parts[0] != "manifests" or not parts[3].endswith(".json"):
            raise BadInput(f"bad manifest path {path!r}: expected manifests/<recipe>/<step>/<key>.json")
        return self.get_manifest(parts[1], parts[2], parts[3][: -len(".json")])

    def list_manifests(self, recipe: Optional[str] = None, step: Optional[str] = None) -> list[tuple[str, str, str]]:
        """(recipe, step, key) of every manifest, optionally of one recipe and/or step."""
        prefix = "manifests/"
        if recipe is not None:
            prefix += check_name("recipe", recipe) + "/"
            if step is not None:
                prefix += check_name("step", step) + "/"
        elif step is not None:
            check_name("step", step)
        out = []
        for k in self._list(prefix):
            parts = k.split("/")
            if len(parts) != 4 or not parts[3].endswith(".json"):
                continue
            r, s, key = parts[1], parts[2], parts[3][: -len(".json")]
            if _is_name(r) and _is_name(s) and _is_name(key) and (step is None or s == step):
                out.append((r, s, key))
        return sorted(out)

    # ------------------------------------------------------------ refs

    @staticmethod
    def ref_path(recipe: str, variant: str, alias: str) -> str:
        return ref_key(recipe, variant, alias)

    def get_ref(self, recipe: str, variant: str, alias: str) -> Optional[tuple[dict, str]]:
        """(value, version token) or None. Pass the token to cas_ref."""
        path = ref_key(recipe, variant, alias)
        got = self._get_with_version(path)
        if got is None:
            return None
        data, version = got
        return self._decode(path, data), version

    def cas_ref(self, recipe: str, variant: str, alias: str, value: dict, expected: Optional[str]) -> bool:
        """Set the ref to value only if its version is still `expected` (None:
        only if it does not exist). False, not an error, when someone else
        moved it first: read it again and decide again."""
        path = ref_key(recipe, variant, alias)
        if not isinstance(value, dict):
            raise BadInput(f"a ref value must be a JSON object, not {type(value).__name__}")
        if expected is not None and not isinstance(expected, str):
            raise BadInput(f"bad ref version {expected!r}")
        if not self._cas(path, encode_ref(value), expected):
            return False
        self._append_history(path, {"at": _now(), "previous_version": expected, "value": value})
        return True

    def list_refs(self, recipe: Optional[str] = None) -> list[tuple[str, str, str]]:
        """(recipe, variant, alias) of every ref, optionally of one recipe."""
        prefix = "refs/" + (check_name("recipe", recipe) + "/" if recipe is not None else "")
        out = []
        for k in self._list(prefix):
            parts = k.split("/")
            if (len(parts) == 4 and _is_name(parts[1]) and _is_name(parts[2]) and _is_name(parts[3])
                    and not parts[3].endswith(HISTORY_SUFFIX)):
                out.append((parts[1], parts[2], parts[3]))
        return sorted(out)

    def ref_history(self, recipe: str, variant: str, alias: str) -> list[dict]:
        """The recorded moves of a ref, oldest first (best effort: may miss some)."""
        data = self._get_bytes(ref_key(recipe, variant, alias) + HISTORY_SUFFIX)
        out = []
        for line in (data or b"").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _append_history(self, ref: str, record: dict) -> None:
        """Append one JSON line to the ref's history by read-append-CAS. Best
        effort: the move already happened, so failures are logged, not raised."""
        key = ref + HISTORY_SUFFIX
        line = canonical_json(record) + b"\n"
        try:
            for _ in range(HISTORY_TRIES):
                cur = self._get_with_version(key)
                body, version = cur if cur else (b"", None)
                if self._cas(key, body + line, version):
                    return
            log.warning("ref history %s in %s: gave up after %d tries", key, self.uri, HISTORY_TRIES)
        except Exception as e:  # noqa: BLE001 - history must never fail a move
            log.warning("ref history %s in %s: not recorded (%s)", key, self.uri, e)

    # ------------------------------------------------------------ reports

    def put_report(self, kind: str, name: str, record: dict) -> str:
        """Write a run record once (reports/<kind>/<name>.json); its key.
        Names sort by time when they start with a UTC timestamp."""
        key = report_key(kind, name)
        if not isinstance(record, dict):
            raise BadInput(f"a report must be a JSON object, not {type(record).__name__}")
        if not self._put_bytes(key, canonical_json(record), if_none_match=True):
            raise StepFailed(f"report {key} already exists in {self.uri}")
        return key

    def list_reports(self, kind: str) -> list[str]:
        """Names of the reports of one kind, in name order."""
        prefix = f"reports/{check_name('report kind', kind)}/"
        names = (k[len(prefix):-len(".json")] for k in self._list(prefix) if k.endswith(".json"))
        return sorted(n for n in names if "/" not in n and _is_name(n))

    def get_report(self, kind: str, name: str) -> Optional[dict]:
        key = report_key(kind, name)
        data = self._get_bytes(key)
        return None if data is None else self._decode(key, data)

    # ------------------------------------------------------------ helpers

    def __reduce__(self):
        """A store travels between processes (a Dask or Ray worker) as its URI."""
        from . import open_store

        return (open_store, (self.uri,))

    def _decode(self, path: str, data: bytes) -> dict:
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise StepFailed(f"{path} in {self.uri} is corrupt (not a JSON object)")
        return value
