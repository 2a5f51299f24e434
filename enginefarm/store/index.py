"""A read-through index of the store's manifests and refs, for the readers of
many of them (the nightly's staleness pass, `ls`, `gc`).

Reading a catalog's worth of manifests one GET at a time costs a request per
step per variant. `Indexed(store)` is the same store, seen through:

- one listing of `manifests/` and one of `refs/`, with a token per object
  that changes whenever its bytes do (S3: the ETag of LIST, 1,000 keys a
  request; a directory: inode, size and mtime);
- one object, `index/manifests-refs.json.gz`: the bytes of every manifest
  and ref read before, each with the token it had.

A read of a ref is answered from the index when the listing shows it with
the token the index recorded (the same bytes), as absent when the listing
does not show it, and by the store otherwise (then recorded). Manifests are
write-once and named by digest: a ref names the sha256 of the publish
manifest it points at, and every manifest names the sha256 of each of its
inputs. A manifest whose index copy has the digest that a ref or manifest
read tonight names for it is answered from the index with no listing (gc
keeps every manifest an alias reaches); any other is one GET, unless
manifests/ was listed (gc lists it: then the listing rule above). A stale
or lost index costs requests, never a wrong answer. Anything written
through the view (an alias moved, a manifest put) is read from the store
from then on. `save()` writes the index back (best effort: a reader without
write access still reads); the nightly and gc save it, the read-only
commands (`ls`, `gc --dry-run`) never write. Blobs, locks, reports and
caches go straight to the store.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..hashing import digest_bytes, digest_json
from .base import Staged, Store, manifest_key

log = logging.getLogger(__name__)

INDEX_KEY = "index/manifests-refs.json.gz"
SCHEMA = "enginefarm.index/1"
SHA = "sha256:"  # the token of a manifest read without a listing: its digest
INDEXED = ("manifests/", "refs/")
FETCHERS = 16  # reads in flight at once when warming the index (prefetch)


class Indexed(Store):
    """`store`, with its manifests and refs read through the index."""

    def __init__(self, store: Store):
        if isinstance(store, Indexed):
            store = store.inner
        self.inner = store
        self.uri = store.uri
        self._listed: dict[str, dict[str, Optional[str]]] = {}  # prefix -> {key: token}
        self._memo: Optional[dict[str, tuple[str, bytes, Optional[str]]]] = None  # key -> (token, bytes, version)
        self._written: set[str] = set()
        self._trusted: dict[str, str] = {}  # manifest key -> the sha256 a ref or a manifest names for it
        self._verified: set[str] = set()
        self._learned: set[str] = set()
        self._djson: dict[str, str] = {}  # sha256 of a manifest's bytes -> digest_json of its decoded value
        self._dirty = False
        self._mu = threading.Lock()
        self._load_mu = threading.Lock()

    # ------------------------------------------------------------ the index

    @staticmethod
    def _indexed(key: str) -> bool:
        return key.startswith(INDEXED)

    def _listing(self, key: str) -> dict[str, Optional[str]]:
        prefix = next(p for p in INDEXED if key.startswith(p))
        with self._mu:
            got = self._listed.get(prefix)
        if got is None:
            # the keys the index holds under prefix: where to cut the listing into ranges listed at once
            known = sorted(k for k in self._load() if k.startswith(prefix))
            got = self.inner._list_versions(prefix, known)
            with self._mu:
                self._listed.setdefault(prefix, got)
        return got

    def _load(self) -> dict[str, tuple[str, bytes, Optional[str]]]:
        if self._memo is not None:
            return self._memo
        with self._load_mu:  # one GET of the index, however many threads ask at once
            if self._memo is not None:
                return self._memo
            return self._fetch_index()

    def _fetch_index(self) -> dict[str, tuple[str, bytes, Optional[str]]]:
        memo: dict = {}
        raw = self.inner._get_bytes(INDEX_KEY)  # a store that cannot be read says so, as for any read
        try:
            doc = json.loads(gzip.decompress(raw)) if raw else {}
            if doc.get("schema") == SCHEMA:
                memo = {k: (t, b.encode(), v) for k, (t, b, v) in doc["entries"].items()}
                self._djson = dict(doc.get("digest_json") or {})
        except Exception as e:  # noqa: BLE001 - an unreadable index is an empty one
            log.warning("store index %s in %s: unreadable (%s); reading the store instead", INDEX_KEY, self.uri, e)
        with self._mu:
            if self._memo is None:
                self._memo = memo
            return self._memo

    def _read(self, key: str, with_version: bool) -> Optional[tuple[bytes, Optional[str]]]:
        """(bytes, version) of an indexed key: from the index when the listing
        says it is unchanged, None when the listing does not have it."""
        if key in self._written:
            got = self.inner._get_with_version(key) if with_version else self.inner._get_bytes(key)
            return (got if with_version else (got, None)) if got is not None else None
        if key.startswith("manifests/") and "manifests/" not in self._listed:
            return self._read_manifest(key)
        listing = self._listing(key)
        if key not in listing:
            return None
        token = listing[key]
        memo = self._load()
        hit = memo.get(key)
        if token is not None and hit is not None and (hit[2] is not None or not with_version):
            if hit[0] == token:
                self._learn(key, hit[1])
                return hit[1], hit[2]
            if hit[0].startswith(SHA) and self.inner._token_matches(token, hit[1]):  # read without a listing before
                with self._mu:
                    memo[key] = (token, hit[1], hit[2])
                    self._dirty = True
                self._learn(key, hit[1])
                return hit[1], hit[2]
        if with_version:
            got = self.inner._get_with_version(key)
            data, version = got if got is not None else (None, None)
        else:
            data, version = self.inner._get_bytes(key), None
        if data is None:
            return None
        if token is not None:
            with self._mu:
                memo[key] = (token, data, version)
                self._dirty = True
        self._learn(key, data)
        return data, version

    def _read_manifest(self, key: str) -> Optional[tuple[bytes, Optional[str]]]:
        """A manifest, without a listing: from the index when its bytes have
        the digest that a ref or a manifest read tonight names for it (write
        once, content-addressed: the same bytes; and gc keeps every manifest
        an alias reaches), else one GET."""
        want = self._trusted.get(key)
        hit = self._load().get(key)
        if want is not None and hit is not None and (key in self._verified or digest_bytes(hit[1]) == want):
            self._verified.add(key)
            self._learn(key, hit[1])
            return hit[1], None
        data = self.inner._get_bytes(key)
        if data is None:
            return None
        with self._mu:
            self._memo[key] = (SHA + digest_bytes(data), data, None)  # type: ignore[index]
            self._dirty = True
        self._learn(key, data)
        return data, None

    def _learn(self, key: str, data: bytes) -> None:
        """The digests this object names: a ref's manifest, a manifest's inputs."""
        if key in self._learned:
            return
        if key.startswith("manifests/") and "manifests/" in self._listed:
            return  # a listing answers for every manifest (gc): what one names is not needed, nor a second decode
        self._learned.add(key)
        try:
            value = json.loads(data)
            if key.startswith("refs/"):
                if isinstance(value.get("manifest"), str) and isinstance(value.get("digest"), str):
                    self._trusted.setdefault(value["manifest"], value["digest"])
                return
            recipe = key.split("/")[1]
            for inp in (value.get("inputs") or {}).values():
                self._trusted.setdefault(manifest_key(recipe, inp["step"], inp["key"]), inp["digest"])
        except Exception:  # noqa: BLE001 - history lines, odd values: nothing learned
            return

    def prime(self, recipe: str, variants: Iterable[str], alias: str = "latest") -> None:
        """Read each variant's alias and the publish manifest it points at:
        the digests of the whole chain it was built from are then known, so
        its manifests are answered from the index (a cold index: read)."""
        for v in variants:
            got = self.get_ref(recipe, v, alias)
            path = (got[0] if got else {}).get("manifest")
            if isinstance(path, str) and path in self._trusted:
                self._read_manifest(path)

    def get_manifest_and_digest(self, recipe: str, step: str, key: str) -> Optional[tuple[dict, str]]:
        """(manifest, digest_json of it); the digest is kept in the index by
        the sha256 of the bytes it was computed from."""
        path = manifest_key(recipe, step, key)
        data = self._get_bytes(path)
        if data is None:
            return None
        m = self._decode(path, data)
        h = digest_bytes(data)
        d = self._djson.get(h)
        if d is None:
            d = digest_json(m)
            with self._mu:
                self._djson[h] = d
                self._dirty = True
        return m, d

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read the keys that the index cannot answer, several at once (a
        cold index: the first night, a new store)."""
        todo = []
        memo = self._load()
        for k in keys:
            if not self._indexed(k) or k in self._written:
                continue
            hit = memo.get(k)
            if k.startswith("manifests/") and "manifests/" not in self._listed:
                want = self._trusted.get(k)
                if want is None or hit is None or digest_bytes(hit[1]) != want:
                    todo.append(k)
                continue
            token = self._listing(k).get(k, "")
            if token != "" and (token is None or hit is None or
                                (hit[0] != token and not (hit[0].startswith(SHA) and
                                                          self.inner._token_matches(token, hit[1])))):
                todo.append(k)
        if todo:
            with ThreadPoolExecutor(max_workers=min(FETCHERS, len(todo))) as pool:
                list(pool.map(lambda k: self._read(k, k.startswith("refs/")), todo))

    def save(self) -> bool:
        """Write the index back when it learned something (best effort):
        every entry the listings still show with the same token."""
        if self._memo is None or not (self._dirty or self._listed):
            return False
        keep = {}
        for k, (t, b, v) in self._memo.items():
            prefix = next(p for p in INDEXED if k.startswith(p))
            listing = self._listed.get(prefix)
            if k in self._written or (listing is not None and listing.get(k) != t):
                continue
            keep[k] = [t, b.decode(), v]
        if not self._dirty and len(keep) == len(self._memo):
            return False
        shas = {digest_bytes(b.encode()) for _, b, _ in keep.values()}
        doc = {"schema": SCHEMA, "entries": keep, "digest_json": {h: d for h, d in self._djson.items() if h in shas}}
        try:
            self.inner._put_bytes(INDEX_KEY, gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), 1))
            self._dirty = False
            return True
        except Exception as e:  # noqa: BLE001 - an accelerator: the next reader reads the store
            log.warning("store index %s in %s: not written (%s)", INDEX_KEY, self.uri, e)
            return False

    # ------------------------------------------------------------ primitives

    def _exists(self, key: str) -> bool:
        if self._indexed(key) and key not in self._written:
            return key in self._listing(key)
        return self.inner._exists(key)

    def _get_bytes(self, key: str) -> Optional[bytes]:
        if self._indexed(key):
            got = self._read(key, False)
            return got[0] if got else None
        return self.inner._get_bytes(key)

    def _get_with_version(self, key: str) -> Optional[tuple[bytes, str]]:
        if self._indexed(key):
            got = self._read(key, True)
            return (got[0], got[1]) if got else None  # type: ignore[return-value]
        return self.inner._get_with_version(key)

    def _list(self, prefix: str) -> list[str]:
        if self._indexed(prefix) and not self._written:
            return [k for k in self._listing(prefix) if k.startswith(prefix)]
        return self.inner._list(prefix)

    def _list_versions(self, prefix: str, known: Optional[list[str]] = None) -> dict[str, Optional[str]]:
        return self.inner._list_versions(prefix, known)

    def _wrote(self, key: str) -> None:
        with self._mu:
            self._written.add(key)

    def _put_bytes(self, key: str, data: bytes, if_none_match: bool = False) -> bool:
        self._wrote(key)
        return self.inner._put_bytes(key, data, if_none_match)

    def _put_file(self, key: str, path: Path, digest: str, size: int) -> None:
        self.inner._put_file(key, path, digest, size)

    def _get_file(self, key: str, dest: Path, size: Optional[int] = None) -> Optional[tuple[str, int]]:
        return self.inner._get_file(key, dest, size)

    def _cas(self, key: str, data: bytes, expected: Optional[str]) -> bool:
        self._wrote(key)
        return self.inner._cas(key, data, expected)

    def _delete(self, key: str) -> None:
        self._wrote(key)
        self.inner._delete(key)

    def _sweep_partials(self, max_age: float) -> int:
        return self.inner._sweep_partials(max_age)

    @contextmanager
    def _stage_file(self, path: Path) -> Iterator[Staged]:
        with self.inner._stage_file(path) as staged:
            yield staged

    @contextmanager
    def _stage_consumed(self, path: Path) -> Iterator[Staged]:
        with self.inner._stage_consumed(path) as staged:
            yield staged

    def _link_file(self, key: str, dest: Path) -> Optional[tuple[str, int]]:
        return self.inner._link_file(key, dest)
