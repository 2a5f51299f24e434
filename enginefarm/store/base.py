"""The store interface: blobs by sha256, write-once manifests, refs moved by
compare-and-swap. Implementations provide byte-level primitives only; every
rule (naming, hashing, verification, atomicity of pulls) lives here.

    blobs/sha256/ab/abcdef...            immutable, written once
    manifests/<recipe>/<step>/<key>.json immutable
    refs/<recipe>/<variant>/<alias>      mutable pointer, compare-and-swap
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional

from ..errors import BadInput, StepFailed
from ..hashing import canonical_json, digest_bytes, digest_file

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CorruptBlob(StepFailed):
    """A blob's bytes do not hash to its name."""


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise BadInput(f"bad {kind} {value!r}: use lower-case letters, digits, '.', '_', '-' (no '..', no '/')")
    return value


def check_digest(value: str) -> str:
    if not isinstance(value, str) or not HEX64.match(value):
        raise BadInput(f"bad sha256 digest {value!r}: expected 64 lower-case hex digits")
    return value


class Store(ABC):
    uri: str = ""

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        """Write; with if_none_match, only if absent (False when it existed)."""

    @abstractmethod
    def _put_blob_from(self, key: str, path: Path, digest: str) -> None:
        """Store a verified file under key (absent before)."""

    @abstractmethod
    def _get_bytes(self, key: str) -> Optional[bytes]: ...

    @abstractmethod
    def _download(self, key: str, dest: Path) -> None:
        """Copy the object at key to the path dest (a new file)."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Keys under prefix (recursive)."""

    @abstractmethod
    def _get_versioned(self, key: str) -> Optional[tuple[bytes, str]]: ...

    @abstractmethod
    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    # ------------------------------------------------------------------ blobs

    @staticmethod
    def blob_key(digest: str) -> str:
        check_digest(digest)
        return f"blobs/sha256/{digest[:2]}/{digest}"

    def has_blob(self, digest: str) -> bool:
        return self._exists(self.blob_key(digest))

    def put_blob_file(self, path) -> tuple[str, int]:
        path = Path(path)
        digest, size = digest_file(path)
        if not self.has_blob(digest):
            self._put_blob_from(self.blob_key(digest), path, digest)
        return digest, size

    def put_blob_bytes(self, data: bytes) -> str:
        digest = digest_bytes(data)
        key = self.blob_key(digest)
        if not self._exists(key):
            self._put_bytes(key, data, if_none_match=True)
        return digest

    def get_blob_file(self, digest: str, dest, size: Optional[int] = None) -> None:
        """Fetch a blob to dest atomically, verified; nothing at dest if it is corrupt."""
        key = self.blob_key(digest)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp)
        try:
            tmp.unlink()
            self._download(key, tmp)
            got, n = digest_file(tmp)
            if got != digest or (size is not None and n != size):
                raise CorruptBlob(f"blob sha256:{digest} in {self.uri} is corrupt (its bytes hash to {got}, {n} bytes)")
            os.replace(tmp, dest)
        except FileNotFoundError:
            raise StepFailed(f"blob sha256:{digest} is missing from {self.uri}") from None
        finally:
            if tmp.exists():
                tmp.unlink()

    def read_blob(self, digest: str) -> bytes:
        data = self._get_bytes(self.blob_key(digest))
        if data is None:
            raise StepFailed(f"blob sha256:{digest} is missing from {self.uri}")
        if digest_bytes(data) != digest:
            raise CorruptBlob(f"blob sha256:{digest} in {self.uri} is corrupt")
        return data

    def list_blobs(self) -> list[str]:
        return sorted(k.rsplit("/", 1)[-1] for k in self._list("blobs/sha256/"))

    def delete_blob(self, digest: str) -> None:
        self._delete(self.blob_key(digest))

    # ------------------------------------------------------------------ manifests

    @staticmethod
    def manifest_path(recipe: str, step: str, key: str) -> str:
        return f"manifests/{check_name('recipe', recipe)}/{check_name('step', step)}/{check_name('key', key)}.json"

    def put_manifest(self, recipe: str, step: str, key: str, manifest: dict) -> str:
        """Write once; if a manifest is already there, it stays and its digest is returned."""
        path = self.manifest_path(recipe, step, key)
        data = canonical_json(manifest)
        if self._put_bytes(path, data, if_none_match=True):
            return digest_bytes(data)
        existing = self._get_bytes(path)
        return digest_bytes(existing) if existing is not None else digest_bytes(data)

    def get_manifest_by_path(self, path: str) -> Optional[dict]:
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "manifests" or not parts[3].endswith(".json"):
            raise BadInput(f"bad manifest path {path!r}")
        return self.get_manifest(parts[1], parts[2], parts[3][: -len(".json")])

    def get_manifest(self, recipe: str, step: str, key: str) -> Optional[dict]:
        data = self._get_bytes(self.manifest_path(recipe, step, key))
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise StepFailed(f"manifest {self.manifest_path(recipe, step, key)} in {self.uri} is corrupt") from None

    def list_manifests(self, recipe: Optional[str] = None, step: Optional[str] = None) -> list[tuple[str, str, str]]:
        prefix = "manifests/"
        if recipe:
            prefix += check_name("recipe", recipe) + "/"
            if step:
                prefix += check_name("step", step) + "/"
        out = []
        for k in self._list(prefix):
            parts = k.split("/")
            if len(parts) == 4 and parts[3].endswith(".json"):
                out.append((parts[1], parts[2], parts[3][:-5]))
        return sorted(out)

    # ------------------------------------------------------------------ refs

    @staticmethod
    def ref_path(recipe: str, variant: str, alias: str) -> str:
        return f"refs/{check_name('recipe', recipe)}/{check_name('variant', variant)}/{check_name('alias', alias)}"

    def get_ref(self, recipe: str, variant: str, alias: str) -> Optional[tuple[dict, str]]:
        got = self._get_versioned(self.ref_path(recipe, variant, alias))
        if got is None:
            return None
        data, version = got
        return json.loads(data), version

    def cas_ref(self, recipe: str, variant: str, alias: str, value: dict, expected: Optional[str]) -> bool:
        path = self.ref_path(recipe, variant, alias)
        ok = self._cas(path, json.dumps(value, sort_keys=True, indent=1).encode(), expected)
        if ok:  # best-effort history: one immutable record per move
            stamp = value.get("moved_at", "").replace(":", "").replace("-", "").replace("+", "z")
            rec = f"{path}.history/{stamp.lower() or 'unknown'}-{digest_bytes(json.dumps(value).encode())[:12]}.json"
            try:
                self._put_bytes(rec, json.dumps(value, sort_keys=True).encode(), if_none_match=True)
            except Exception:
                pass
        return ok

    def list_refs(self, recipe: Optional[str] = None) -> list[tuple[str, str, str]]:
        prefix = "refs/" + (check_name("recipe", recipe) + "/" if recipe else "")
        out = []
        for k in self._list(prefix):
            parts = k.split("/")
            if len(parts) == 4 and ".history" not in parts[3] and not parts[3].endswith(".lock"):
                out.append((parts[1], parts[2], parts[3]))
        return sorted(out)
