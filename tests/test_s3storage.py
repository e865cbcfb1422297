"""The S3 run store against the local AWS-API server: the Storage contract LocalStorage keeps too."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from fsd_runtime.aws.clients import client
from fsd_runtime.aws.s3storage import S3Storage
from fsd_runtime.storage import LocalStorage, StorageError, make_storage, pack_arrays, unpack_arrays


@pytest.fixture
def store(aws_settings):
    bucket = f"fsd-store-{uuid.uuid4().hex[:10]}"
    client("s3", aws_settings).create_bucket(Bucket=bucket)
    return S3Storage(bucket, aws_settings)


def test_round_trip_list_and_delete_like_local_storage(store, tmp_path):
    local = LocalStorage(str(tmp_path))
    keys = ["runs/a/shares/0.npz", "runs/a/shares/1.npz", "runs/a/results/0.npz", "runs/ab/x.json"]
    for s in (store, local):
        for i, key in enumerate(keys):
            s.put(key, bytes([i]) * (i + 1))
        s.put(keys[0], b"replaced")
    for s in (store, local):
        assert s.get(keys[0]) == b"replaced" and s.get(keys[3]) == b"\x03" * 4
        assert s.exists(keys[1]) and not s.exists("runs/a/shares/9.npz")
    assert store.list("runs/a") == local.list("runs/a") == sorted(keys[:3])  # not runs/ab
    store.delete(keys[1])
    store.delete(keys[1])  # already gone: fine
    assert not store.exists(keys[1])
    store.delete_prefix("runs/a")
    assert store.list("runs/a") == [] and store.list("runs/ab") == [keys[3]]


def test_arrays_survive_without_pickle(store):
    arrays = {"rows": np.arange(12, dtype=np.float32).reshape(3, 4), "ids": np.array([5, 7], np.int64)}
    store.put("runs/r/results/0.npz", pack_arrays(arrays))
    back = unpack_arrays(store.get("runs/r/results/0.npz"), "result")
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_missing_keys_and_bad_keys_are_storage_errors(store):
    with pytest.raises(StorageError, match="no stored object"):
        store.get("runs/none/shares/0.npz")
    for bad in ("/abs", "runs/../x", "runs//x", "runs/a b", ""):
        with pytest.raises(StorageError):
            store.put(bad, b"x")


def test_missing_bucket_is_a_storage_error(aws_settings):
    with pytest.raises(StorageError, match="no-such-bucket"):
        S3Storage(f"no-such-bucket-{uuid.uuid4().hex[:8]}", aws_settings).put("runs/x", b"1")


def test_a_gone_bucket_holds_nothing_to_list_or_delete(aws_settings):
    """Removing a dead run's objects after teardown deleted the bucket: nothing left, no error
    (``fsd-inference clean`` once failed on every call, keeping the run's record forever)."""
    gone = S3Storage(f"no-such-bucket-{uuid.uuid4().hex[:8]}", aws_settings)
    assert gone.list("runs/dead") == []
    gone.delete_prefix("runs/dead")


def test_config_rebuilds_the_store_in_a_worker(store, aws_settings):
    rebuilt = make_storage(store.config())
    store.put("runs/c/k", b"v")
    assert isinstance(rebuilt, S3Storage) and rebuilt.get("runs/c/k") == b"v"
    with pytest.raises(StorageError):
        make_storage({"kind": "s3", "bucket": "x"})  # not a bucket name
    with pytest.raises(StorageError):
        make_storage({"kind": "s3", "bucket": store.bucket, "aws": {"nonsense": 1}})


def test_create_is_atomic_and_worker_stores_only_create(store, tmp_path, aws):
    local = LocalStorage(str(tmp_path))
    for s in (store, local):
        assert s.create("runs/c/claims/0", b"first") is True
        assert s.create("runs/c/claims/0", b"second") is False
        assert s.get("runs/c/claims/0") == b"first"
    assert aws.requests["PutObject"] == 2  # both were conditional PUTs, S3 refused the second
    worker_store = make_storage(store.config())  # what a worker event's storage config builds
    assert store.config()["create_only"] is True and worker_store.create_only
    worker_store.put("runs/c/results/0.npz", b"r")
    with pytest.raises(StorageError, match="only creates"):
        worker_store.put("runs/c/results/0.npz", b"overwrite")
    assert store.get("runs/c/results/0.npz") == b"r"
    with pytest.raises(StorageError, match="unknown fields"):
        make_storage({**store.config(), "endpoint": "http://evil"})
