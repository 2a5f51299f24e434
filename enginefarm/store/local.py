"""The local-directory store (the embedded default).

Every write goes to a private temp file first (fsync'ed), then appears in
one atomic step: os.replace for mutable objects, a hard link (which never
replaces an existing name) for write-once ones. Immutable objects are made
read-only (0o444). Refs are moved under an exclusive `fcntl.flock` on a lock
file beside them (`.<alias>.lock`), so compare-and-swap holds across threads
and processes. Names starting with '.' are private (temp, lock, staging) and
never listed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..hashing import CHUNK, copy_hashed
from .base import Staged, Store

# errors of os.link on filesystems without hard links
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
STAGING = ".staging"


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self._staging = self.root / STAGING

    # ------------------------------------------------------------ helpers

    def _path(self, key: str) -> Path:
        # keys are built by Store from checked names; this is a last guard
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"unsafe store key {key!r}")
        return self.root / key

    @staticmethod
    def _new_tmp(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
        os.close(fd)
        return Path(name)

    @staticmethod
    def _write_synced(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def _locked(self, target: Path) -> Iterator[None]:
        """An exclusive lock for target, across threads and processes. The
        lock file stays (removing it would let two holders lock different files)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _create_exclusive(self, tmp: Path, target: Path) -> bool:
        """Make the complete file tmp appear at target unless something is there
        already (False). A hard link never replaces an existing name; where the
        filesystem has none, a lock + check + rename does the same job."""
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
        with self._locked(target):
            if target.exists():
                return False
            os.replace(tmp, target)
            return True

    # ------------------------------------------------------------ primitives

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        target = self._path(key)
        tmp = self._new_tmp(target.parent)
        try:
            self._write_synced(tmp, data)
            if if_none_match:
                os.chmod(tmp, 0o444)
                return self._create_exclusive(tmp, target)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _stage_file(self, path: Path) -> Iterator[Staged]:
        """Copy the source into the store's staging area while hashing it:
        the source is read once, and what gets stored is exactly what was hashed."""
        tmp = self._new_tmp(self._staging)
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                digest, size = copy_hashed(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            yield Staged(tmp, digest, size)
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _stage_consumed(self, path: Path) -> Iterator[Staged]:
        """The file moved into the staging area (same filesystem), hashed in
        place: no copy of a model-sized output. Elsewhere: _stage_file's copy."""
        tmp = self._new_tmp(self._staging)
        try:
            try:
                os.replace(path, tmp)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                tmp.unlink(missing_ok=True)
                with self._stage_file(path) as staged:
                    yield staged
                return
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
                h, size = hashlib.sha256(), 0
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
            yield Staged(tmp, h.hexdigest(), size)
        finally:
            tmp.unlink(missing_ok=True)

    def _link_file(self, key: str, dest: Path) -> Optional[tuple[str, int]]:
        src = self._path(key)
        try:
            os.link(src, dest)
        except FileNotFoundError:  # no such blob: the copy path says so
            return None
        except OSError as e:
            if e.errno in _NO_LINKS or e.errno == errno.EXDEV:
                return None
            raise
        h, size = hashlib.sha256(), 0
        with open(dest, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def _put_file(self, key: str, path: Path, digest: str, size: int) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.parent == self._staging:  # our own private copy: publish it as is
            os.chmod(path, 0o444)
            try:
                self._create_exclusive(path, target)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:  # blobs/ on another filesystem: copy below
                    raise
        tmp = self._new_tmp(target.parent)
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(tmp, 0o444)
            self._create_exclusive(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _get_file(self, key: str, dest: Path, size: Optional[int] = None) -> Optional[tuple[str, int]]:
        # a copy, never a link: editing a pulled file must not touch the store
        try:
            src = open(self._path(key), "rb")
        except FileNotFoundError:
            return None
        with src, open(dest, "wb") as dst:
            return copy_hashed(src, dst)

    def _list(self, prefix: str) -> list[str]:
        start = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        if not prefix.endswith("/"):
            start = start.parent
        out = []
        for d, dirs, files in os.walk(start):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            rel = Path(d).relative_to(self.root).as_posix()
            for f in files:
                if f.startswith("."):
                    continue
                k = f if rel == "." else f"{rel}/{f}"
                if k.startswith(prefix):
                    out.append(k)
        return out

    def _list_versions(self, prefix: str, known: Optional[list[str]] = None) -> dict[str, Optional[str]]:
        """Tokens from a stat: inode, size and mtime. Every write makes a new
        file (a temp file renamed or linked into place), so a new inode."""
        out: dict[str, Optional[str]] = {}
        for k in self._list(prefix):
            try:
                s = self._path(k).stat()
            except FileNotFoundError:
                continue
            out[k] = f"{s.st_ino}:{s.st_size}:{s.st_mtime_ns}"
        return out

    def _get_with_version(self, key: str) -> Optional[tuple[bytes, str]]:
        data = self._get_bytes(key)
        if data is None:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        target = self._path(key)
        with self._locked(target):
            cur = self._get_with_version(key)
            if (cur[1] if cur else None) != expected:
                return False
            tmp = self._new_tmp(target.parent)
            try:
                self._write_synced(tmp, data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return True

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _sweep_partials(self, max_age: float) -> int:
        """Private temp files (`.*.tmp`, staging copies) of killed writers."""
        import time

        cutoff, n = time.time() - max_age, 0
        if not self.root.is_dir():
            return 0
        for d, _, files in os.walk(self.root):
            for f in files:
                p = Path(d) / f
                if (f.startswith(".") and f.endswith(".tmp")) or Path(d) == self._staging:
                    try:
                        if p.stat().st_mtime < cutoff:
                            p.unlink()
                            n += 1
                    except FileNotFoundError:
                        pass
        return n
