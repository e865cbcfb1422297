"""End to end: coordinator, local channel (Unix sockets), launch tree: bit-identical to the serial run."""
import json
import subprocess
import sys

import numpy as np
import pytest

import fsd_kernels
from fsd_runtime import model, partition as partitioning
from fsd_runtime.coordinator import run_distributed
from fsd_runtime.prepared import prepare


@pytest.fixture(scope="module")
def serial(official, official_packed):
    return fsd_kernels.infer(*official.images.arrays, official_packed)


def partition_volume(net, n_workers, method):
    return partitioning.volume(net, partitioning.make_partition(net, n_workers, method))


def assert_same(result, serial):
    a = result.activations
    np.testing.assert_array_equal(a.indptr, serial.indptr)
    np.testing.assert_array_equal(a.indices, serial.indices)
    np.testing.assert_array_equal(a.data.view(np.uint32), serial.data.view(np.uint32))


@pytest.mark.parametrize("n_workers, partition", [(1, "contiguous")] + [
    (p, method) for p in (2, 3, 8) for method in ("contiguous", "hypergraph")])  # P=1: one partition
def test_official_run_is_bit_identical_and_golden(official, official_packed, serial, n_workers, partition):
    result = run_distributed(official_packed, official.images.arrays, n_workers, partition=partition,
                             launcher={"kind": "thread"}, receive_timeout=60)
    assert_same(result, serial)
    np.testing.assert_array_equal(result.categories, official.categories)     # the 337
    t = result.traffic
    assert (t["messages"] == 0) == (n_workers == 1)
    # the rows each pair really exchanged are the plan's, in every layer that had traffic
    plan = partition_volume(official_packed, n_workers, partition)
    layers = {p["layer"] for p in result.pairs}
    for p in result.pairs:
        assert p["rows"] == plan["rows"][p["layer"]][p["source"]][p["target"]]
    assert sum(p["rows"] for p in result.pairs) == sum(plan["volume"][l] for l in layers)
    assert sum(p["bytes"] for p in result.pairs) == t["bytes"]
    # early exit: ~20 rounds, not 120; a round: the pairs that exchange rows + at most 2 (P-1) status
    assert t["messages"] <= 20 * (len({(p["source"], p["target"]) for p in result.pairs}) + 2 * (n_workers - 1))
    assert sum(t["messages_per_round"]) == t["messages"] and t["messages_per_round"][21:] == [0] * 99
    assert "workers_cpu_s" not in result.timings    # threads: one process clock for all workers


def test_synthetic_run_in_batches_is_bit_identical():
    ds = model.synthetic(1024, 30, 400, seed=7)
    net = ds.network.pack()
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    result = run_distributed(net, ds.images.arrays, 3, launcher={"kind": "thread"}, batch_size=150,
                             receive_timeout=60, channel={"kind": "local", "max_chunk_bytes": 256})
    assert_same(result, serial)
    assert serial.categories.size > 0
    assert result.traffic["chunks"] > result.traffic["messages"]    # small chunks really split
    assert result.traffic["batches"] == 3                              # 400 images in runs of 150


def test_forked_workers_are_bit_identical():
    """The fork launcher: worker 0 a process, every other forked from its tree parent."""
    ds = model.synthetic(1024, 16, 300, seed=4)
    net = ds.network.pack()
    result = run_distributed(net, ds.images.arrays, 7, launcher={"kind": "fork"}, receive_timeout=120)
    assert_same(result, fsd_kernels.infer(*ds.images.arrays, net))
    assert all(m["peak_rss_kb"] > 10_000 for m in result.worker_metrics)  # VmHWM, read by each worker


def test_bad_partition_and_tree_fail_before_anything_starts(official_packed, official):
    with pytest.raises(ValueError, match="partition"):
        run_distributed(official_packed, official.images.arrays, 2, partition="random")
    with pytest.raises(ValueError, match="fan-out"):
        run_distributed(official_packed, official.images.arrays, 2, fanout=0)
    with pytest.raises(ValueError, match="unknown launcher kind"):
        run_distributed(official_packed, official.images.arrays, 2, launcher={"kind": "teleport"})


def _identity_net(n: int):
    eye = (np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int32), np.ones(n, np.float32))
    return fsd_kernels.pack([eye], [np.zeros(n, np.float32)], n, 32.0)


_BAD_IMAGES = {  # name: (CSR arrays over 3 neurons, what the error must say)
    "negative neuron": (([0, 1], [-1], [5.0]), "must lie in"),
    "neuron beyond N": (([0, 1], [3], [5.0]), "must lie in"),
    "repeated neuron": (([0, 2], [1, 1], [1.0, 2.0]), "strictly increase"),
    "unsorted row": (([0, 2], [2, 1], [1.0, 2.0]), "strictly increase"),
    "NaN": (([0, 1], [1], [np.nan]), "finite"),
    "inf": (([0, 1], [1], [np.inf]), "finite"),
    "beyond float32": (([0, 1], [1], [1e39]), "finite"),
    "indptr past nnz": (([0, 1, 3], [0, 1], [1.0, 1.0]), "indptr"),
    "indptr decreasing": (([0, 2, 1, 2], [0, 1], [1.0, 1.0]), "decrease"),
    "indptr starting at 1": (([1, 2, 3], [0, 1, 2], [1.0, 1.0, 1.0]), "start at 0"),
    "empty indptr": (([], [], []), "at least one entry"),
    "fractional indices": (([0, 1], [0.5], [1.0]), "indices"),
}


@pytest.mark.parametrize("case", sorted(_BAD_IMAGES))
def test_bad_images_are_refused_before_launch_as_serially(case, tmp_path):
    """What fsd_kernels.infer refuses, run_distributed refuses too, with its message, before
    anything is partitioned or launched (it once ran them: a negative neuron id wrapped to the
    last neuron, a repeated one kept its last value, NaN passed where no weight read it)."""
    net = _identity_net(3)
    (indptr, indices, data), says = _BAD_IMAGES[case]
    images = (np.array(indptr, np.int64), np.array(indices), np.array(data, np.float64))
    with pytest.raises(ValueError, match=says):
        fsd_kernels.infer(*images, net)
    prepare(net, tmp_path / "model", 2)
    for kwargs in ({"net": net}, {"net": None, "prepared": tmp_path / "model"}):
        with pytest.raises(ValueError, match=says):  # the launcher kind is checked later: no launch
            run_distributed(images=images, n_workers=2, launcher={"kind": "teleport"}, **kwargs)


def test_numpy_integer_options_are_taken_and_bad_batch_sizes_refused_before_launch():
    net = _identity_net(3)
    images = (np.array([0, 1, 2], np.int64), np.array([0, 2], np.int32), np.array([1.0, 2.0], np.float32))
    result = run_distributed(net, images, np.int64(2), fanout=np.int32(2), batch_size=np.int64(1),
                             launcher={"kind": "thread"})
    assert_same(result, fsd_kernels.infer(*images, net))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            run_distributed(net, images, 2, batch_size=bad, launcher={"kind": "teleport"})


def test_cli_runs_a_tree_of_worker_processes_with_metrics(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "run", "--workers", "4", "--json",
                          "--metrics-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["golden_match"] is True and len(report["categories"]) == 337
    assert report["workers"] == 4 and report["channel"] == "local" and report["partition"] == "hypergraph"
    assert set(report["traffic"]) >= {"messages", "bytes", "requests"}
    assert 0 < report["traffic"]["bytes"] < 10.4e6
    assert report["startup_seconds"] > 0 and report["wall_seconds"] > 0
    with open(report["metrics_path"]) as f:
        metrics = json.load(f)
    assert len(metrics["rows"]) == 4 * 120
    # worker processes report their CPU in the run (thread launchers share one process clock: none)
    timings = metrics["summary"]["timings"]
    assert 0 < timings["workers_cpu_s"] < 4 * timings["launch_to_done_s"]
    assert metrics["totals"]["bytes_sent"] == report["traffic"]["bytes"]
    assert (tmp_path / "metrics.csv").read_text().startswith("worker,layer,")
    assert sum(p["bytes"] for p in metrics["pairs"]) == report["traffic"]["bytes"]


def test_metrics_merge_totals_and_files(tmp_path, monkeypatch):
    from fsd_runtime import metrics as mx

    a, b = mx.LayerMetrics(0, 3), mx.LayerMetrics(1, 3)
    a.add(1, "bytes_sent", 100)
    a.add(1, "compute_s", 0.5)
    b.add(1, "bytes_sent", 50)
    b.add(1, "compute_s", 0.2)
    rows = mx.merge([a.to_dict(), b.to_dict()])
    assert len(rows) == 6 and mx.totals(rows)["bytes_sent"] == 150
    layer1 = mx.per_layer(rows)[1]
    assert layer1["bytes_sent"] == 150 and layer1["compute_s"] == 0.5     # times: the slowest worker
    with pytest.raises(ValueError, match="unexpected fields"):
        mx.merge([{"worker": 0, "fields": ["bytes"], "layers": [[1]]}])
    paths = mx.write(rows, str(tmp_path / "m"))
    assert set(paths) >= {"json", "csv"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in paths
    else:
        assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # the optional extra missing
    assert "png" not in mx.write(rows, str(tmp_path / "n"))


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.pop("times"), "'times'"),
    (lambda r: r["times"].update(finished="soon"), "'times'"),
    (lambda r: r["times"].update(cpu_s=float("nan")), "'times'"),
    (lambda r: r["times"].update(ready=10 ** 400), "'times'"),
    (lambda r: r.update(batches=0), "'batches'"),
    (lambda r: r.update(batches=True), "'batches'"),
    (lambda r: r.update(requests={"sns_billed_requests": -1}), "'requests'"),
    (lambda r: r.update(requests=[1, 2]), "'requests'"),
    (lambda r: r.update(model_reads={"gets": "2", "bytes": 10}), "'model_reads'"),
])
def test_a_malformed_metrics_record_is_a_run_error_naming_its_worker(tmp_path, change, problem):
    from fsd_runtime import events
    from fsd_runtime.coordinator import RunError, _metrics_record
    from fsd_runtime.storage import LocalStorage

    store = LocalStorage(str(tmp_path / "store"))
    good = {"times": {"started": 1.0, "ready": 2.0, "finished": 3.0, "cpu_s": 0.5}, "batches": 2,
            "requests": {"sns_billed_requests": 4}, "model_reads": {"gets": 3, "bytes": 100, "segments": [0]}}
    store.put(events.metrics_key("p", 0), json.dumps(good).encode())
    assert _metrics_record(store, "p", 0) == good
    bad = json.loads(json.dumps(good))
    change(bad)
    store.put(events.metrics_key("p", 5), json.dumps(bad).encode())
    with pytest.raises(RunError, match=rf"worker 5: malformed metrics record: {problem}"):
        _metrics_record(store, "p", 5)


@pytest.mark.parametrize("damage", ["a word for a count", "infinite bytes", "no layers"])
def test_malformed_per_layer_metrics_fail_the_run_with_a_run_error(monkeypatch, damage):
    """A worker's per-layer table comes from outside as well: nonsense in it is a RunError that
    says so, not a ValueError, OverflowError or KeyError from the middle of the summary."""
    from fsd_runtime import metrics
    from fsd_runtime.coordinator import RunError

    real = metrics.LayerMetrics.to_dict

    def damaged(self):
        out = real(self)
        if self.worker == 1:
            if damage == "a word for a count":
                out["layers"][0][0] = "many"
            elif damage == "infinite bytes":
                out["layers"][0][metrics.FIELDS.index("bytes_sent")] = float("inf")
            else:
                del out["layers"]
        return out

    monkeypatch.setattr(metrics.LayerMetrics, "to_dict", damaged)
    net = _identity_net(3)
    images = (np.array([0, 1, 2], np.int64), np.array([0, 2], np.int32), np.array([1.0, 2.0], np.float32))
    with pytest.raises(RunError, match="malformed worker metrics"):
        run_distributed(net, images, 2, launcher={"kind": "thread"})
