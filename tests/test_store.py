"""The same store tests against the local directory and the S3 test server
(moto in server mode, over HTTP)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from enginefarm.errors import BadInput
from enginefarm.hashing import digest_bytes
from enginefarm.store import CorruptBlob, open_store


def test_blob_round_trip_and_verification(store, tmp_path):
    src = tmp_path / "engine.bin"
    src.write_bytes(b"engine bytes " * 1000)
    d, n = store.put_blob_file(src)
    assert d == digest_bytes(src.read_bytes()) and n == 13000
    assert store.has_blob(d) and d in store.list_blobs()
    out = tmp_path / "out" / "engine.bin"
    store.get_blob_file(d, out, size=n)
    assert out.read_bytes() == src.read_bytes()
    assert store.read_blob(store.put_blob_bytes(b"abc")) == b"abc"


def _count_writes(store):
    """How many object writes the store makes from now on."""
    calls = []
    if hasattr(store, "s3"):
        store.s3.meta.events.register("before-call.s3.PutObject", lambda **kw: calls.append("put"))
        store.s3.meta.events.register("before-call.s3.CreateMultipartUpload", lambda **kw: calls.append("mpu"))
    else:
        orig = store._put_blob_from

        def spy(*a, **kw):
            calls.append("put")
            return orig(*a, **kw)

        store._put_blob_from = spy
    return calls


def test_existing_blob_is_never_written_again(store, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"x" * 4096)
    d, _ = store.put_blob_file(src)
    writes = _count_writes(store)
    d2, _ = store.put_blob_file(src)
    assert d2 == d and writes == []


def test_corrupt_blob_detected_and_nothing_written(store, tmp_path):
    d = store.put_blob_bytes(b"good bytes")
    store._delete(store.blob_key(d))
    store._put_bytes(store.blob_key(d), b"evil bytes")
    dest = tmp_path / "pull" / "f.bin"
    with pytest.raises(CorruptBlob, match=d):
        store.get_blob_file(d, dest)
    assert not dest.exists() and list((tmp_path / "pull").iterdir()) == []
    with pytest.raises(CorruptBlob):
        store.read_blob(d)


def test_manifests_are_write_once(store):
    d1 = store.put_manifest("r", "build", "k1", {"a": 1})
    d2 = store.put_manifest("r", "build", "k1", {"a": 2})
    assert d1 == d2 and store.get_manifest("r", "build", "k1") == {"a": 1}
    store.put_manifest("r", "fetch", "k2", {"b": 1})
    store.put_manifest("q", "fetch", "k3", {"c": 1})
    assert store.list_manifests("r") == [("r", "build", "k1"), ("r", "fetch", "k2")]
    assert store.list_manifests("r", "fetch") == [("r", "fetch", "k2")]
    assert len(store.list_manifests()) == 3
    assert store.get_manifest("r", "build", "nope") is None
    assert store.get_manifest_by_path(store.manifest_path("q", "fetch", "k3")) == {"c": 1}


def test_ref_compare_and_swap(store):
    assert store.get_ref("r", "v", "latest") is None
    assert store.cas_ref("r", "v", "latest", {"digest": "1"}, None)
    assert not store.cas_ref("r", "v", "latest", {"digest": "x"}, None)  # exists already
    value, ver = store.get_ref("r", "v", "latest")
    assert value == {"digest": "1"}
    assert not store.cas_ref("r", "v", "latest", {"digest": "2"}, "stale-version")
    assert store.cas_ref("r", "v", "latest", {"digest": "2"}, ver)
    assert not store.cas_ref("r", "v", "latest", {"digest": "3"}, ver)  # ver is stale now
    assert store.get_ref("r", "v", "latest")[0] == {"digest": "2"}
    assert store.list_refs() == [("r", "v", "latest")]


def test_racing_writers_exactly_one_wins(store):
    store.cas_ref("r", "v", "prod", {"n": 0}, None)
    _, ver = store.get_ref("r", "v", "prod")
    wins = []
    barrier = threading.Barrier(6)

    def writer(i):
        barrier.wait()
        if store.cas_ref("r", "v", "prod", {"n": i}, ver):
            wins.append(i)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(1, 7)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(wins) == 1 and store.get_ref("r", "v", "prod")[0] == {"n": wins[0]}


def _proc_writer(root, ver, i, q):
    st = open_store(root)
    q.put(i if st.cas_ref("r", "v", "prod", {"n": i}, ver) else None)


def test_local_racing_processes_exactly_one_wins(tmp_path):
    root = str(tmp_path / "store")
    st = open_store(root)
    st.cas_ref("r", "v", "prod", {"n": 0}, None)
    _, ver = st.get_ref("r", "v", "prod")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_proc_writer, args=(root, ver, i, q)) for i in range(1, 7)]
    [p.start() for p in ps]
    [p.join() for p in ps]
    wins = [x for x in (q.get() for _ in ps) if x is not None]
    assert len(wins) == 1 and st.get_ref("r", "v", "prod")[0] == {"n": wins[0]}


@pytest.mark.parametrize("bad", ["..", "../x", "/abs", "a/b", "", "UPPER", "a b", "-x"])
def test_bad_names_are_refused(store, bad):
    with pytest.raises(BadInput):
        store.get_ref(bad, "v", "latest")
    with pytest.raises(BadInput):
        store.put_manifest("r", bad, "k", {})
    with pytest.raises(BadInput):
        store.has_blob(bad)


@pytest.mark.parametrize("uri", ["ftp://x/y", "s3://", "s3://UPPER/x", "s3://b/../x", "file://relative"])
def test_bad_store_uris(uri):
    with pytest.raises(BadInput):
        open_store(uri)


def test_missing_bucket_is_bad_input(s3_server):
    st = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(BadInput, match="does not exist"):
        st.get_ref("r", "v", "latest")
