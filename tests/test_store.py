"""The same store tests against the local directory and a real S3-compatible
HTTP server (moto in server mode; never an in-process mock)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest

from enginefarm.errors import BadInput, StepFailed
from enginefarm.hashing import canonical_json, digest_bytes, digest_json
from enginefarm.store import CorruptBlob, MissingBlob, open_store
from enginefarm.store.local import LocalStore
from enginefarm.store.s3 import S3Store

MiB = 1024 * 1024


def _is_s3(store) -> bool:
    return isinstance(store, S3Store)


def _race(n: int, fn) -> list:
    """Run fn(i) for i in 1..n in n threads released together; the truthy results."""
    barrier = threading.Barrier(n)
    out, lock = [], threading.Lock()

    def run(i):
        barrier.wait()
        r = fn(i)
        if r:
            with lock:
                out.append(r)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(1, n + 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


# ---------------------------------------------------------------------- blobs


def test_blob_round_trip_and_verification(store, tmp_path):
    src = tmp_path / "engine.bin"
    src.write_bytes(b"engine bytes " * 1000)
    d, n = store.put_blob_file(src)
    assert (d, n) == (digest_bytes(src.read_bytes()), 13000)
    assert store.has_blob(d) and store.list_blobs() == [d]
    assert not store.has_blob("0" * 64)

    out = tmp_path / "out" / "sub" / "engine.bin"
    store.get_blob_file(d, out, size=n)
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["engine.bin"]  # no temp left beside it
    store.get_blob_file(d, out)  # over an existing file
    assert out.read_bytes() == src.read_bytes()

    # editing a pulled file never touches the store (a copy, not a link)
    out.write_bytes(b"edited")
    assert store.read_blob(d) == src.read_bytes()

    d2 = store.put_blob_bytes(b"abc")
    assert d2 == digest_bytes(b"abc") and store.read_blob(d2) == b"abc"
    assert store.list_blobs() == sorted([d, d2])
    store.delete_blob(d2)
    assert not store.has_blob(d2) and store.list_blobs() == [d]


def test_local_blobs_are_read_only_and_staging_is_clean(tmp_path):
    st = open_store(str(tmp_path / "store"))
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    d, _ = st.put_blob_file(src)
    blob = tmp_path / "store" / "blobs" / "sha256" / d[:2] / d
    assert blob.stat().st_mode & 0o777 == 0o444
    assert blob.stat().st_ino != src.stat().st_ino
    assert [p for p in (tmp_path / "store").rglob(".*") if p.is_file()] == []  # no temp/staging leftovers


def test_step_inputs_are_links_and_step_outputs_are_moved_in_on_one_filesystem(store, tmp_path):
    """What a step reads (materialize: link=True) and what it gives up (store_files' consumed outputs) cost
    no second copy of a model-sized file on a local store; on S3 they are the plain download and upload.
    Either way the bytes are verified and a corrupt blob is refused."""
    out = tmp_path / "out.bin"
    out.write_bytes(b"w" * 10000)
    ino = out.stat().st_ino
    d, n = store.put_blob_file(out, consume=True)
    assert (d, n) == (digest_bytes(b"w" * 10000), 10000)
    local = not _is_s3(store)
    assert out.exists() != local  # moved in (local) / left where it was (S3 uploads a copy)
    dest = tmp_path / "scratch" / "in.bin"
    store.get_blob_file(d, dest, size=n, link=True)
    assert dest.read_bytes() == b"w" * 10000
    if local:
        blob = Path(store.uri) / store.blob_key(d)
        assert blob.stat().st_ino == dest.stat().st_ino == ino and blob.stat().st_mode & 0o777 == 0o444
        assert [p for p in Path(store.uri).rglob(".*") if p.is_file()] == []  # no staging leftovers
        dest.unlink()  # removing the scratch copy leaves the blob
        assert blob.read_bytes() == b"w" * 10000
    bad = store.put_blob_bytes(b"good bytes")
    store._put_bytes(store.blob_key(bad), b"evil bytes")
    with pytest.raises(CorruptBlob, match=bad):
        store.get_blob_file(bad, tmp_path / "scratch" / "bad.bin", link=True)
    assert not (tmp_path / "scratch" / "bad.bin").exists()
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ([] if local else ["in.bin"])


def _watch_writes(store) -> list:
    """Every write request (or local file creation under the store) from now on."""
    calls: list = []
    if _is_s3(store):
        for op in ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "CopyObject"):
            store.s3.meta.events.register(f"before-call.s3.{op}", lambda op=op, **kw: calls.append(op))
    else:
        for name in ("_put_file", "_put_bytes"):
            orig = getattr(store, name)

            def spy(*a, _orig=orig, _name=name, **kw):
                calls.append(_name)
                return _orig(*a, **kw)

            setattr(store, name, spy)
    return calls


def _blob_stamp(store, digest):
    if _is_s3(store):
        h = store.s3.head_object(Bucket=store.bucket, Key=store.prefix + store.blob_key(digest))
        return h["LastModified"], h["ETag"]
    s = os.stat(Path(store.uri) / store.blob_key(digest))
    return s.st_ino, s.st_mtime_ns, s.st_ctime_ns


def test_existing_blob_is_never_written_again(store, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"x" * 4096)
    d, _ = store.put_blob_file(src)
    b = store.put_blob_bytes(b"small")
    before = (_blob_stamp(store, d), _blob_stamp(store, b))
    writes = _watch_writes(store)
    assert store.put_blob_file(src) == (d, 4096)
    copy = tmp_path / "copy.bin"  # same content, another file
    copy.write_bytes(src.read_bytes())
    assert store.put_blob_file(copy) == (d, 4096)
    assert store.put_blob_bytes(b"small") == b
    assert writes == []
    assert (_blob_stamp(store, d), _blob_stamp(store, b)) == before


def test_corrupt_blob_detected_and_nothing_left_at_dest(store, tmp_path):
    d = store.put_blob_bytes(b"good bytes")
    store._put_bytes(store.blob_key(d), b"evil bytes")  # corrupt it through the raw primitive
    pull = tmp_path / "pull"
    with pytest.raises(CorruptBlob, match=d):
        store.get_blob_file(d, pull / "f.bin")
    assert list(pull.iterdir()) == []
    with pytest.raises(CorruptBlob, match=d):
        store.read_blob(d)

    # right bytes, wrong expected size: refused too
    ok = store.put_blob_bytes(b"right")
    with pytest.raises(CorruptBlob, match=ok):
        store.get_blob_file(ok, pull / "g.bin", size=99)
    assert list(pull.iterdir()) == []

    # a missing blob is a StepFailed naming it, with nothing left behind either
    missing = "f" * 64
    with pytest.raises(MissingBlob, match=missing):
        store.get_blob_file(missing, pull / "h.bin")
    with pytest.raises(StepFailed):
        store.read_blob(missing)
    assert list(pull.iterdir()) == []


def test_s3_multipart_upload_with_checksums(s3_store_uri, tmp_path):
    base = open_store(s3_store_uri)
    st = S3Store(base.bucket, base.prefix, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(5 * MiB + 1024))
    calls = []
    st.s3.meta.events.register("provide-client-params.s3.CreateMultipartUpload", lambda params, **kw: calls.append(params))
    d, n = st.put_blob_file(src)
    assert n == 5 * MiB + 1024 and len(calls) == 1 and calls[0].get("ChecksumAlgorithm") == "CRC32"
    out = tmp_path / "big.out"
    st.get_blob_file(d, out, size=n)
    assert out.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------- manifests


def test_manifests_are_write_once(store):
    m1 = {"a": 1, "files": {"x": {"sha256": "0" * 64, "size": 1}}}
    d1 = store.put_manifest("r", "build", "k1", m1)
    assert d1 == digest_json(m1)
    d2 = store.put_manifest("r", "build", "k1", {"a": 2})
    assert d2 == d1 and store.get_manifest("r", "build", "k1") == m1
    assert store._get_bytes(store.manifest_path("r", "build", "k1")) == canonical_json(m1)

    store.put_manifest("r", "fetch", "k2", {"b": 1})
    store.put_manifest("q", "fetch", "k3", {"c": 1})
    assert store.list_manifests() == [("q", "fetch", "k3"), ("r", "build", "k1"), ("r", "fetch", "k2")]
    assert store.list_manifests("r") == [("r", "build", "k1"), ("r", "fetch", "k2")]
    assert store.list_manifests("r", "fetch") == [("r", "fetch", "k2")]
    assert store.list_manifests(step="fetch") == [("q", "fetch", "k3"), ("r", "fetch", "k2")]
    assert store.list_manifests("nope") == []
    assert store.get_manifest("r", "build", "nope") is None

    path = store.manifest_path("q", "fetch", "k3")
    assert path == "manifests/q/fetch/k3.json"
    assert store.get_manifest_by_path(path) == {"c": 1}
    for bad in ("manifests/q/fetch/k3", "blobs/q/fetch/k3.json", "manifests/../fetch/k3.json", "manifests/q/k3.json"):
        with pytest.raises(BadInput):
            store.get_manifest_by_path(bad)


def test_racing_manifest_writers_agree(store):
    def put(i):
        return store.put_manifest("r", "build", "race", {"writer": i})

    digests = _race(6, put)
    stored = store.get_manifest("r", "build", "race")
    assert len(digests) == 6 and set(digests) == {digest_json(stored)}


# ---------------------------------------------------------------------- refs


def test_ref_compare_and_swap(store):
    assert store.get_ref("r", "v", "latest") is None
    assert store.cas_ref("r", "v", "latest", {"digest": "1"}, None)
    assert not store.cas_ref("r", "v", "latest", {"digest": "x"}, None)  # exists already
    value, ver = store.get_ref("r", "v", "latest")
    assert value == {"digest": "1"}
    assert not store.cas_ref("r", "v", "latest", {"digest": "2"}, "stale-version")
    assert store.cas_ref("r", "v", "latest", {"digest": "2"}, ver)
    assert not store.cas_ref("r", "v", "latest", {"digest": "3"}, ver)  # ver is stale now
    value, ver2 = store.get_ref("r", "v", "latest")
    assert value == {"digest": "2"} and ver2 != ver
    assert not store.cas_ref("r", "v", "missing", {"digest": "1"}, ver2)  # expected a ref that is not there

    store.cas_ref("r", "w", "validated", {"digest": "1"}, None)
    store.cas_ref("q", "v", "latest", {"digest": "1"}, None)
    assert store.list_refs() == [("q", "v", "latest"), ("r", "v", "latest"), ("r", "w", "validated")]
    assert store.list_refs("r") == [("r", "v", "latest"), ("r", "w", "validated")]

    hist = store.ref_history("r", "v", "latest")
    assert [h["value"] for h in hist] == [{"digest": "1"}, {"digest": "2"}]
    assert hist[0]["previous_version"] is None and hist[1]["previous_version"] == ver


def test_ref_history_lives_outside_refs_and_an_older_store_keeps_its_history(store):
    """Listing `refs/` (every nightly, ls, gc) lists refs only; a store
    written before the move (history at refs/.../<alias>.history.jsonl) still
    shows its old moves, before the new ones."""
    from enginefarm.store import base

    legacy = base.ref_key("r", "v", "latest") + base.HISTORY_SUFFIX
    store._put_bytes(legacy, base.canonical_json({"at": "then", "previous_version": None,
                                                  "value": {"digest": "0"}}) + b"\n")
    assert store.cas_ref("r", "v", "latest", {"digest": "1"}, None)
    assert [k for k in store._list("refs/") if k != legacy] == ["refs/r/v/latest"]
    assert store._list("history/") == ["history/r/v/latest.jsonl"]
    assert [h["value"] for h in store.ref_history("r", "v", "latest")] == [{"digest": "0"}, {"digest": "1"}]
    # gc moves it out of refs/ (its dry run does not), keeping every line in order
    from enginefarm.flows.gc import gc

    assert "histories_moved" not in gc(store, keep=1, dry_run=True) and store._list(legacy) == [legacy]
    assert gc(store, keep=1)["histories_moved"] == 1
    assert store._list("refs/") == ["refs/r/v/latest"]
    assert [h["value"] for h in store.ref_history("r", "v", "latest")] == [{"digest": "0"}, {"digest": "1"}]


def test_racing_writers_exactly_one_wins(store):
    # create: N writers, expected=None
    wins = _race(8, lambda i: i if store.cas_ref("r", "v", "prod", {"n": i}, None) else None)
    assert len(wins) == 1 and store.get_ref("r", "v", "prod")[0] == {"n": wins[0]}
    # move: N writers with the same (current) expected version
    _, ver = store.get_ref("r", "v", "prod")
    wins = _race(8, lambda i: 100 + i if store.cas_ref("r", "v", "prod", {"n": 100 + i}, ver) else None)
    assert len(wins) == 1 and store.get_ref("r", "v", "prod")[0] == {"n": wins[0]}


def _proc_writer(root, ver, i, go, q):
    st = open_store(root)
    go.wait(timeout=60)
    q.put(i if st.cas_ref("r", "v", "prod", {"n": i}, ver) else None)


def test_local_racing_processes_exactly_one_wins(tmp_path):
    root = str(tmp_path / "store")
    st = open_store(root)
    assert isinstance(st, LocalStore)
    st.cas_ref("r", "v", "prod", {"n": 0}, None)
    _, ver = st.get_ref("r", "v", "prod")
    ctx = mp.get_context("spawn")  # fork is unsafe once threads run (moto, torch, prefect)
    go, q = ctx.Barrier(6), ctx.Queue()  # all six are ready before any writes
    ps = [ctx.Process(target=_proc_writer, args=(root, ver, i, go, q)) for i in range(1, 7)]
    for p in ps:
        p.start()
    results = [q.get(timeout=30) for _ in ps]
    for p in ps:
        p.join(timeout=30)
        assert p.exitcode == 0
    wins = [x for x in results if x is not None]
    assert len(wins) == 1 and st.get_ref("r", "v", "prod")[0] == {"n": wins[0]}


# ---------------------------------------------------------------------- names and URIs


BAD_NAMES = ["..", "../x", "a..b", "/abs", "a/b", "", "UPPER", "a b", "-x", ".hidden", "x" * 129, "x\n", None]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused(store, bad):
    calls = [
        lambda: store.get_ref(bad, "v", "latest"),
        lambda: store.get_ref("r", bad, "latest"),
        lambda: store.cas_ref("r", "v", bad, {}, None),
        lambda: store.put_manifest("r", bad, "k", {}),
        lambda: store.put_manifest("r", "s", bad, {}),
        lambda: store.get_manifest(bad, "s", "k"),
        lambda: store.manifest_path("r", "s", bad),
        *([lambda: store.list_manifests(bad), lambda: store.list_refs(bad)] if bad is not None else []),
        lambda: store.has_blob(bad),
        lambda: store.read_blob(bad),
        lambda: store.delete_blob(bad),
    ]
    for call in calls:
        with pytest.raises(BadInput) as e:
            call()
        assert repr(bad) in str(e.value)
    assert store.list_manifests() == [] and store.list_refs() == []


def test_bad_digests_and_reserved_alias(store, tmp_path):
    for bad in ("A" * 64, "0" * 63, "g" * 64, "../" + "0" * 61):
        with pytest.raises(BadInput, match="digest"):
            store.get_blob_file(bad, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(BadInput, match="reserved"):
        store.cas_ref("r", "v", "latest.history.jsonl", {}, None)


@pytest.mark.parametrize(
    "uri",
    ["ftp://x/y", "s3://", "s3:///x", "s3://UPPER/x", "s3://b/x", "s3://ok-bucket/../x", "s3://ok-bucket/a/./b",
     "s3:bucket/x", "file://relative", "file://otherhost/x", "http://example.com/farm"],
)
def test_bad_store_uris(uri):
    with pytest.raises(BadInput, match="bad store"):
        open_store(uri)


def test_credentials_in_uri_are_refused_and_not_echoed():
    with pytest.raises(BadInput) as e:
        open_store("s3://AKIAEXAMPLE:s3cr3t@bucket/x")
    assert "s3cr3t" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


def test_store_file_is_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(BadInput, match="not a directory"):
        open_store(str(f))


def test_good_uris_and_default(tmp_path, monkeypatch, s3_server):
    assert open_store(f"file://{tmp_path}/a").uri == str(tmp_path / "a")
    assert open_store(str(tmp_path / "b")).uri == str(tmp_path / "b")
    monkeypatch.setenv("ENGINEFARM_STORE", str(tmp_path / "env"))
    assert open_store().uri == str(tmp_path / "env")
    monkeypatch.delenv("ENGINEFARM_STORE")
    monkeypatch.chdir(tmp_path)
    assert open_store().uri == str(tmp_path / ".farm")
    st = open_store("s3://some-bucket//a/b/")
    assert isinstance(st, S3Store) and st.uri == "s3://some-bucket/a/b"
    assert open_store("s3://some-bucket").uri == "s3://some-bucket"


def test_missing_bucket_is_bad_input(s3_server):
    st = open_store("s3://no-such-bucket-here/x")  # nothing contacted yet
    with pytest.raises(BadInput, match="does not exist"):
        st.get_ref("r", "v", "latest")


def test_the_index_answers_what_did_not_change_and_rereads_what_did(store):
    """store/index.py: a second reader answers unchanged manifests and refs
    from the index (no GET), re-reads a ref someone moved, and sees a
    deleted manifest as gone; a lost index costs requests, not answers."""
    from enginefarm.store.index import INDEX_KEY, Indexed

    m = {"step": "fetch", "n": 1}
    d1 = store.put_manifest("r", "fetch", "k1", m)
    store.put_manifest("r", "fetch", "k2", {"step": "fetch", "n": 2})
    path = store.manifest_path("r", "fetch", "k1")
    assert store.move_alias("r", "v", "latest", path, d1, "test")

    first = Indexed(store)
    assert first.get_manifest("r", "fetch", "k1") == m
    assert first.get_manifest("r", "fetch", "k2")["n"] == 2
    assert first.get_ref("r", "v", "latest")[0]["digest"] == d1
    assert first.get_manifest("r", "fetch", "nope") is None
    assert first.save()

    gets: list[str] = []
    real = (type(store)._get_bytes, type(store)._get_with_version)
    spy = Indexed(store)
    spy.inner = type("Spy", (), {})()
    for name in ("_list_versions", "_put_bytes", "_cas", "_delete", "_exists", "_list"):
        setattr(spy.inner, name, getattr(store, name))
    spy.inner._get_bytes = lambda k: (gets.append(k), real[0](store, k))[1]
    spy.inner._get_with_version = lambda k: (gets.append(k), real[1](store, k))[1]
    # the ref (its listing token unchanged) names the manifest's digest: both from the index
    assert spy.get_ref("r", "v", "latest")[0]["digest"] == d1 and spy.get_manifest("r", "fetch", "k1") == m
    assert gets == [INDEX_KEY], gets  # the index itself, nothing else
    assert spy.get_manifest("r", "fetch", "k2")["n"] == 2  # no digest names it: read
    assert gets == [INDEX_KEY, store.manifest_path("r", "fetch", "k2")], gets

    # someone else moves the ref and deletes a manifest: the next reader sees both
    assert store.move_alias("r", "v", "latest", path, "b" * 64, "test")
    store.delete_manifest("r", "fetch", "k2")
    again = Indexed(store)
    value, version = again.get_ref("r", "v", "latest")
    assert value["digest"] == "b" * 64 and version == store.get_ref("r", "v", "latest")[1]
    assert again.get_manifest("r", "fetch", "k2") is None
    # moving an alias through the view reads it from the store from then on
    assert again.move_alias("r", "v", "latest", path, "c" * 64, "test")
    assert again.get_ref("r", "v", "latest")[0]["digest"] == "c" * 64
    assert again.save()

    store._put_bytes(INDEX_KEY, b"not gzip")  # an unreadable index is an empty one
    lost = Indexed(store)
    assert lost.get_ref("r", "v", "latest")[0]["digest"] == "c" * 64 and lost.get_manifest("r", "fetch", "k1") == m


def test_s3_listing_in_ranges_cut_at_known_keys_gives_the_same_keys(s3_store_uri, monkeypatch):
    """With known keys (the index's), S3 lists ranges of the key space at once: one LIST request a range, all
    in flight together, and exactly the keys one listing gives, whatever was added or removed since."""
    import enginefarm.store.s3 as s3mod

    st = open_store(s3_store_uri)
    keys = [f"refs/r{i:03d}/v/latest" for i in range(0, 60, 2)]
    for k in keys:
        st._put_bytes(k, k.encode())
    monkeypatch.setattr(s3mod, "LIST_PAGE", 4)  # a page of 4 keys: 30 keys make ranges without 30,000 objects
    plain = st._list_versions("refs/")
    assert sorted(plain) == keys
    calls: list = []
    st.s3.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(kw["params"]))
    assert st._list_versions("refs/", keys) == plain
    assert len(calls) == 8  # one request a range: 30 keys cut at every 4th
    # keys added between the known ones, before the first and after the last, and known keys gone
    for k in ["refs/a/v/latest", "refs/r007/v/latest", "refs/r031/v/x", "refs/z/v/latest"]:
        st._put_bytes(k, b"new")
    for k in keys[5:9]:
        st._delete(k)
    assert st._list_versions("refs/", keys) == st._list_versions("refs/")
    assert st._list_versions("refs/", ["refs/zz"] * 9) == st._list_versions("refs/")  # a useless hint costs nothing
