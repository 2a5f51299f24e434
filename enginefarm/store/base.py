"""The store interface: blobs by sha256, write-once manifests, refs moved by
compare-and-swap.

Layout, relative to the store root (a directory, or s3://bucket/prefix):

    blobs/sha256/ab/abcdef...                      immutable, written once
    manifests/<recipe>/<step>/<key>.json           immutable canonical JSON
    refs/<recipe>/<variant>/<alias>                mutable JSON, moved by CAS
    history/<recipe>/<variant>/<alias>.jsonl       one line per ref move (best effort; stores written
                                                   before 2026-12-07 kept it at refs/.../<alias>.history.jsonl,
                                                   still read)
    locks/<s|x>-<id>.json                          shared (build) / exclusive (gc) locks
    reports/<kind>/<name>.json                     write-once run records (the nightly's)
    index/manifests-refs.json.gz                   a read-through copy of manifests and refs
                                                   (an accelerator, see `index.py`; never the truth)

Every rule lives here: name safety, key building, hashing, verification,
atomic pulls, JSON encoding, write-once and CAS semantics. An implementation
provides only the byte-level primitives declared abstract below (plus,
optionally, `_stage_file`), and never sees a key that was not built here from
checked names.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import random
import re
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import BadInput, StepFailed
from ..hashing import canonical_json, digest_bytes, digest_file, digest_json

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# one component of a file path inside a manifest (what a pull writes under DEST)
REL_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}$")
HISTORY_SUFFIX = ".history.jsonl"
HISTORY_TRIES = 8
ALIAS_TRIES = 20
LOCKS = "locks/"
LOCK_TTL = 120.0  # a lock not refreshed for this long is stale
LOCK_REFRESH = 30.0


class CorruptBlob(StepFailed):
    """A blob's bytes do not hash to its name (or have the wrong size)."""


class MissingBlob(StepFailed):
    """A blob that a manifest names is not in the store."""


class StoreBusy(StepFailed):
    """The store lock could not be had in time (gc vs. builds)."""


# ---------------------------------------------------------------------- names


def check_name(kind: str, value: Any) -> str:
    """A recipe/step/key/variant/alias: one safe path component, or BadInput."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise BadInput(
            f"bad {kind} {value!r}: use 1-128 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', no '..')"
        )
    return value


def check_digest(value: Any) -> str:
    """A sha256 digest: 64 lower-case hex digits, or BadInput."""
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise BadInput(f"bad sha256 digest {value!r}: expected 64 lower-case hex digits")
    return value


def check_alias(value: Any) -> str:
    check_name("alias", value)
    if value.endswith(HISTORY_SUFFIX):
        raise BadInput(f"bad alias {value!r}: names ending in {HISTORY_SUFFIX!r} are reserved for ref history")
    return value


def check_rel_path(value: Any) -> str:
    """A file path inside a manifest: relative, '/'-separated, each part of
    letters, digits, '.', '_', '+', '-' (not starting with '.'), so that it
    can never name anything outside the directory it is laid out in."""
    parts = value.split("/") if isinstance(value, str) and len(value) <= 1024 else [None]
    if not all(isinstance(p, str) and REL_PART.fullmatch(p) for p in parts):
        raise BadInput(
            f"bad file path {value!r}: expected a relative path of letters, digits, '.', '_', '+', '-' "
            "(no '..', no absolute path, no part starting with '.')"
        )
    return value


def parse_manifest_key(path: Any) -> tuple[str, str, str]:
    """(recipe, step, key) of manifests/<recipe>/<step>/<key>.json, or BadInput."""
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 4 or parts[0] != "manifests" or not parts[3].endswith(".json"):
        raise BadInput(f"bad manifest path {path!r}: expected manifests/<recipe>/<step>/<key>.json")
    recipe, step, key = parts[1], parts[2], parts[3][: -len(".json")]
    manifest_key(recipe, step, key)  # checks every name
    return recipe, step, key


def who() -> str:
    """user@host of this process (recorded on alias moves and locks)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = os.environ.get("USER", "unknown")
    return f"{user}@{platform.node()}"


def blob_key(digest: str) -> str:
    check_digest(digest)
    return f"blobs/sha256/{digest[:2]}/{digest}"


def manifest_key(recipe: str, step: str, key: str) -> str:
    return f"manifests/{check_name('recipe', recipe)}/{check_name('step', step)}/{check_name('key', key)}.json"


def report_key(kind: str, name: str) -> str:
    return f"reports/{check_name('report kind', kind)}/{check_name('report', name)}.json"


def ref_key(recipe: str, variant: str, alias: str) -> str:
    return f"refs/{check_name('recipe', recipe)}/{check_name('variant', variant)}/{check_alias(alias)}"


def history_key(recipe: str, variant: str, alias: str) -> str:
    """Where a ref's moves are appended: outside `refs/`, so that listing the
    refs (every nightly, `ls`, gc) lists refs only. On S3 at 1,000 variants
    the histories were half of the `refs/` pages."""
    return f"history/{check_name('recipe', recipe)}/{check_name('variant', variant)}/{check_alias(alias)}.jsonl"


def _is_name(s: str) -> bool:
    return bool(NAME.fullmatch(s)) and ".." not in s


# ---------------------------------------------------------------------- encoding


def encode_ref(value: dict) -> bytes:
    """A ref's stored bytes: sorted, readable JSON (its version is derived from them)."""
    return (json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True, default=str) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _after(previous: Any) -> str:
    """Now, or just after `previous` (an ISO time) if the clock says earlier:
    the moves of an alias get strictly increasing times along the
    compare-and-swap chain, whatever the clocks of the hosts that moved it."""
    now = datetime.now(timezone.utc)
    try:
        floor = datetime.fromisoformat(previous) + timedelta(milliseconds=1)
    except (TypeError, ValueError):
        return now.isoformat(timespec="milliseconds")
    return max(now, floor).isoformat(timespec="milliseconds")


_DEPTH_GUARD = threading.Lock()


def _lock_live(info: dict) -> bool:
    """Whether a lock still holds: not expired and, on this host, its process alive."""
    try:
        if float(info.get("expires", 0)) < time.time():
            return False
    except (TypeError, ValueError):
        return False
    if info.get("host") == platform.node():
        try:
            os.kill(int(info.get("pid")), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, TypeError, ValueError):
            pass
    return True


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
    def _get_file(self, key: str, dest: Path, size: Optional[int] = None) -> Optional[tuple[str, int]]:
        """Copy the object at key over the existing file dest (a private temp
        file), hashing the bytes as they are written: their (sha256, size),
        or None if there is no object at key. `size`, when known, is the
        expected size (a hint for how to fetch it)."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Every key under prefix (recursively), in any order."""

    def _list_versions(self, prefix: str, known: Optional[list[str]] = None) -> dict[str, Optional[str]]:
        """{key: a token that changes whenever the object's bytes do} of every
        key under prefix, in one listing (S3: the ETags LIST returns). The
        token need not be the compare-and-swap version. None: unknown (a
        reader must then fetch the object). `known`: keys under prefix seen
        before, sorted (the index's), a hint a store may use to list ranges of
        the key space at once; the answer never depends on it. This default
        knows no tokens."""
        return dict.fromkeys(self._list(prefix))

    def _token_matches(self, token: Optional[str], data: bytes) -> bool:
        """Whether a listing token is that of these bytes (False: cannot tell)."""
        return False

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

    def _sweep_partials(self, max_age: float) -> int:
        """Remove what writers killed half-way left behind (temp files,
        incomplete multipart uploads) older than max_age seconds; how many.
        Called by gc, under the exclusive lock."""
        return 0

    @contextmanager
    def _stage_file(self, path: Path) -> Iterator[Staged]:
        """Hash a source file before it is stored. The default reads it in
        place; a store may override this to copy while hashing (reading the
        source once) and yield its own private copy instead."""
        digest, size = digest_file(path)
        yield Staged(path, digest, size)

    @contextmanager
    def _stage_consumed(self, path: Path) -> Iterator[Staged]:
        """_stage_file for a file the caller gives up (a step's output, removed
        after it is stored): a store that can take it without a copy (a local
        directory on the same filesystem) moves it in. The default copies."""
        with self._stage_file(path) as staged:
            yield staged

    def _link_file(self, key: str, dest: Path) -> Optional[tuple[str, int]]:
        """Make dest (an absent name) a read-only hard link of the object at
        key, after hashing it in place: its (sha256, size); None where this
        store cannot link (the default: other stores, other filesystems)."""
        return None

    # ------------------------------------------------------------ blobs

    @staticmethod
    def blob_key(digest: str) -> str:
        """The relative key of a blob (checks the digest)."""
        return blob_key(digest)

    def has_blob(self, digest: str) -> bool:
        return self._exists(blob_key(digest))

    def put_blob_file(self, path, consume: bool = False) -> tuple[str, int]:
        """Store a file as a blob: (sha256, size). An existing blob is never
        written again. consume: the caller gives the file up (it may be moved
        into the store instead of copied: a model-sized step output costs no
        second copy on disk)."""
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"cannot store {path}: not a file")
        with (self._stage_consumed(path) if consume else self._stage_file(path)) as staged:
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

    def get_blob_file(self, digest: str, dest, size: Optional[int] = None, link: bool = False) -> None:
        """Fetch a blob into dest atomically (a temp file in dest's directory,
        then os.replace), verified against its sha256 (and size, if given)
        before it appears. On any failure nothing is left at dest or beside it.

        link: the caller only reads dest (a step's materialized input, removed
        with its scratch directory): where the store can, dest is a read-only
        hard link of the blob, verified in place, and no bytes are copied."""
        key = blob_key(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            got = None
            if link:
                tmp.unlink()
                got = self._link_file(key, tmp)
                if got is None:  # not linked: copy below
                    tmp.touch()
            linked = got is not None
            if not linked:
                got = self._get_file(key, tmp, size)
            if got is None:
                raise MissingBlob(f"blob sha256:{digest} is missing from {self.uri}")
            self._check_digest(digest, got, size)
            if not linked:  # a link shares the blob's inode (and its read-only mode)
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
            if len(parts) == 4 and HEX64.fullmatch(parts[3]) and parts[2] == parts[3][:2]:
                out.append(parts[3])
        return sorted(out)

    def delete_blob(self, digest: str) -> None:
        self._delete(blob_key(digest))

    def _check_digest(self, digest: str, got_n: tuple[str, int], size: Optional[int]) -> None:
        got, n = got_n
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

    def get_manifest_and_digest(self, recipe: str, step: str, key: str) -> Optional[tuple[dict, str]]:
        """(manifest, digest_json of it) or None: what a step's cache lookup needs."""
        m = self.get_manifest(recipe, step, key)
        return None if m is None else (m, digest_json(m))

    def get_manifest_by_path(self, path: str) -> Optional[dict]:
        """A manifest by its relative key manifests/<recipe>/<step>/<key>.json."""
        return self.get_manifest(*parse_manifest_key(path))

    def delete_manifest(self, recipe: str, step: str, key: str) -> None:
        self._delete(manifest_key(recipe, step, key))

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
        self._append_history(history_key(recipe, variant, alias),
                             {"at": _now(), "previous_version": expected, "value": value})
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
        """The recorded moves of a ref, oldest first (best effort: may miss
        some). Moves are appended after their compare-and-swap, so racing
        movers may append out of order; each move's time is later than the
        one it replaced (see `_after`), which gives the order back."""
        data = self._get_bytes(history_key(recipe, variant, alias)) or b""
        legacy = self._get_bytes(ref_key(recipe, variant, alias) + HISTORY_SUFFIX)  # a store from before
        if legacy:
            data = legacy + b"\n" + data
        out = []
        for line in data.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue

        def moved_at(record: Any) -> datetime:
            try:
                return datetime.fromisoformat(record["value"]["moved_at"])
            except (TypeError, KeyError, ValueError):
                return datetime.min.replace(tzinfo=timezone.utc)

        return sorted(out, key=moved_at)

    def move_alias(self, recipe: str, variant: str, alias: str, manifest: str, digest: str, reason: str,
                   **extra: Any) -> bool:
        """Point an alias at a manifest (its path and digest) by compare-and-swap:
        True if it moved, False if it pointed there already. The new value
        records who moved it, from what, when and why; the move is appended to
        the alias history."""
        parse_manifest_key(manifest)
        check_digest(digest)
        for _ in range(ALIAS_TRIES):
            cur = self.get_ref(recipe, variant, alias)
            value, version = cur if cur else (None, None)
            if value and value.get("digest") == digest and value.get("manifest") == manifest:
                return False
            new = {
                "manifest": manifest,
                "digest": digest,
                "recipe": recipe,
                "variant": variant,
                "alias": alias,
                "previous": value.get("digest") if value else None,
                "previous_manifest": value.get("manifest") if value else None,
                "moved_at": _after(value.get("moved_at") if value else None),
                "moved_by": who(),
                "reason": reason,
                "move_id": uuid.uuid4().hex,
                **extra,
            }
            if self.cas_ref(recipe, variant, alias, new, version):
                return True
            # a write whose response was lost (and retried) looks like a conflict
            again = self.get_ref(recipe, variant, alias)
            if again and again[0].get("move_id") == new["move_id"]:
                self._append_history(history_key(recipe, variant, alias),
                                     {"at": _now(), "previous_version": version, "value": new})
                return True
        raise StepFailed(f"alias {recipe}:{variant}@{alias} kept moving under us ({ALIAS_TRIES} tries)")

    # ------------------------------------------------------------ caches

    # Build accelerators that are not artifacts (a TensorRT timing cache per
    # flavour, version and GPU target): a pointer `caches/<name>.json` to a
    # blob. Last writer wins; a cache never changes what a build produces,
    # only how fast it gets there, so it is not part of any cache key.

    def get_cache(self, name: str) -> Optional[bytes]:
        key = "caches/" + "/".join(check_name("cache name part", p) for p in name.split("/")) + ".json"
        data = self._get_bytes(key)
        if data is None:
            return None
        try:
            digest = check_digest(json.loads(data)["digest"])
        except (ValueError, KeyError, BadInput):
            return None  # an unreadable pointer is a cache miss, not an error
        try:
            return self.read_blob(digest)
        except (MissingBlob, CorruptBlob):
            return None

    def cache_digests(self) -> set[str]:
        """The blobs the cache pointers reach (gc keeps them)."""
        out = set()
        for k in self._list("caches/"):
            try:
                out.add(check_digest(json.loads(self._get_bytes(k) or b"{}")["digest"]))
            except (ValueError, KeyError, BadInput):
                continue
        return out

    def put_cache(self, name: str, data: bytes) -> str:
        key = "caches/" + "/".join(check_name("cache name part", p) for p in name.split("/")) + ".json"
        digest = self.put_blob_bytes(data)
        self._put_bytes(key, encode_ref({"digest": digest, "size": len(data), "at": _now()}))
        return digest

    def move_legacy_histories(self) -> int:
        """Move ref histories that a store written before 2026-12-07 keeps in
        `refs/` (<alias>.history.jsonl) to `history_key`, their lines before
        any written there since. gc calls it under its exclusive lock. The
        number moved."""
        n = 0
        for k in self._list("refs/"):
            parts = k[: -len(HISTORY_SUFFIX)].split("/") if k.endswith(HISTORY_SUFFIX) else []
            if len(parts) != 4 or not all(_is_name(x) for x in parts[1:]):
                continue
            old = self._get_bytes(k)
            if old is None:
                continue
            new_key = history_key(parts[1], parts[2], parts[3])
            for _ in range(HISTORY_TRIES):
                cur = self._get_with_version(new_key)
                body, version = cur if cur else (b"", None)
                if self._cas(new_key, old.rstrip(b"\n") + b"\n" + body, version):
                    self._delete(k)
                    n += 1
                    break
        return n

    def _append_history(self, key: str, record: dict) -> None:
        """Append one JSON line to a ref's history (`history_key`) by
        read-append-CAS. Best effort: the move already happened, so failures
        are logged, not raised."""
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

    # ------------------------------------------------------------ locks
    # gc takes the store exclusively; builds, publishes and promotions share
    # it. Each holder writes its own lock object (locks/<s|x>-<id>.json, with
    # its host, pid and expiry, refreshed while held) and then lists the
    # others: since both sides write before they look, of a gc and a build
    # that start together at least one sees the other and steps back. A lock
    # whose expiry passed, or whose process is gone (same host), is stale.

    @contextmanager
    def lock(self, purpose: str, exclusive: bool = False, wait: float = 600.0) -> Iterator[None]:
        """Hold the store shared (builds) or exclusively (gc) for the block;
        StoreBusy if it cannot be had within `wait` seconds. A shared lock is
        re-entrant within one Store object."""
        if not exclusive:
            with self._lock_guard():
                if self._shared_depth:
                    self._shared_depth += 1
                    reentered = True
                else:
                    reentered = False
            if reentered:
                try:
                    yield
                finally:
                    with self._lock_guard():
                        self._shared_depth -= 1
                return
        key = self._acquire(purpose, exclusive, wait)
        stop = threading.Event()
        body = lambda: self._lock_body("x" if exclusive else "s", purpose)  # noqa: E731

        def refresh():
            while not stop.wait(LOCK_REFRESH):
                try:
                    self._put_bytes(key, body())
                except Exception as e:  # noqa: BLE001 - retried at the next tick
                    log.warning("lock %s in %s: refresh failed (%s)", key, self.uri, e)

        t = threading.Thread(target=refresh, name=f"enginefarm-lock-{key[6:14]}", daemon=True)
        t.start()
        if not exclusive:
            with self._lock_guard():
                self._shared_depth = 1
        try:
            yield
        finally:
            if not exclusive:
                with self._lock_guard():
                    self._shared_depth = 0
            stop.set()
            t.join(timeout=5)
            try:
                self._delete(key)
            except Exception as e:  # noqa: BLE001 - it expires on its own
                log.warning("lock %s in %s: not removed (%s); it expires in %ds", key, self.uri, e, LOCK_TTL)

    def list_locks(self) -> list[dict]:
        """The live locks (stale ones are left out)."""
        out = []
        for k in sorted(self._list(LOCKS)):
            info = self._read_lock(k)
            if info is not None and _lock_live(info):
                out.append({"key": k, **info})
        return out

    _shared_depth = 0  # how many blocks of this object hold its shared lock

    @staticmethod
    def _lock_guard() -> threading.Lock:
        return _DEPTH_GUARD

    def _lock_body(self, kind: str, purpose: str) -> bytes:
        now = time.time()
        return encode_ref({
            "kind": "exclusive" if kind == "x" else "shared", "purpose": purpose, "by": who(),
            "host": platform.node(), "pid": os.getpid(),
            "at": _now(), "expires": now + LOCK_TTL,
        })

    def _read_lock(self, key: str) -> Optional[dict]:
        data = self._get_bytes(key)
        try:
            info = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _acquire(self, purpose: str, exclusive: bool, wait: float) -> str:
        kind = "x" if exclusive else "s"
        key = f"{LOCKS}{kind}-{uuid.uuid4().hex}.json"
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.1
        while True:
            self._put_bytes(key, self._lock_body(kind, purpose))
            blockers = []
            for other in self._list(LOCKS):
                if other == key or (not exclusive and not other.startswith(f"{LOCKS}x-")):
                    continue  # shared locks do not exclude each other
                info = self._read_lock(other)
                if info is not None and _lock_live(info):
                    blockers.append(info)
            if not blockers:
                return key
            self._delete(key)
            if time.monotonic() >= deadline:
                held = "; ".join(f"{b.get('purpose')} by {b.get('by')} (pid {b.get('pid')}) since {b.get('at')}"
                                 for b in blockers)
                raise StoreBusy(f"store {self.uri} is busy ({held}); waited {wait:.0f}s, try again later")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
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
