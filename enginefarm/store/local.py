"""The local-directory store (the embedded default)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .base import Store


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / key

    def _tmp(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        return Path(tmp)

    def _exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        target = self._p(key)
        tmp = self._tmp(target)
        try:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o444 if if_none_match else 0o644)
            if if_none_match:
                try:
                    os.link(tmp, target)  # atomic create-if-absent
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, target)
            return True
        finally:
            if tmp.exists():
                tmp.unlink()

    def _put_blob_from(self, key: str, path: Path, digest: str) -> None:
        target = self._p(key)
        tmp = self._tmp(target)
        try:
            h = hashlib.sha256()
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while b := src.read(8 << 20):
                    h.update(b)
                    dst.write(b)
            if h.hexdigest() != digest:  # the source changed under us
                raise RuntimeError(f"{path} changed while it was stored")
            os.chmod(tmp, 0o444)
            try:
                os.link(tmp, target)
            except FileExistsError:
                pass
        finally:
            if tmp.exists():
                tmp.unlink()

    def _get_bytes(self, key: str) -> Optional[bytes]:
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            return None

    def _download(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._p(key), dest)

    def _list(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        root = base if base.is_dir() else base.parent
        if not root.is_dir():
            return []
        out = []
        for p in root.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                k = p.relative_to(self.root).as_posix()
                if k.startswith(prefix):
                    out.append(k)
        return out

    def _get_versioned(self, key: str) -> Optional[tuple[bytes, str]]:
        data = self._get_bytes(key)
        if data is None:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        target = self._p(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                cur = self._get_versioned(key)
                if (cur[1] if cur else None) != expected:
                    return False
                tmp = self._tmp(target)
                try:
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                finally:
                    if tmp.exists():
                        tmp.unlink()
                return True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _delete(self, key: str) -> None:
        try:
            self._p(key).unlink()
        except FileNotFoundError:
            pass
