"""A worker's budgets (fsd_runtime.budget): the batch size chosen under a memory budget fits it
and is the largest that does (checked against a plain search, not the closed form); runs under a
forced small budget really use several batches and stay bit-identical to the independent scipy
reference (random networks, weights of both signs) and to the serial kernels; a budget that
one image cannot fit is refused before anything starts; timeouts follow the documented formula,
explicit ones win, and a P = 84 local run needs no timeout flag."""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import fsd_kernels
from fsd_runtime import budget, model
from fsd_runtime.coordinator import run_distributed
from fsd_runtime.partition import make_partition
from fsd_runtime.plan import build_shares

from test_differential import assert_bit_identical, images_csr, pack, random_bias, random_images, random_layer, \
    reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_case(seed: int, n: int = 24, n_layers: int = 4, n_images: int = 40, ymax: float = 8.0):
    rng = np.random.default_rng(seed)
    layers = [random_layer(rng, n) for _ in range(n_layers)]
    biases = [random_bias(rng, n) for _ in range(n_layers)]
    return random_images(rng, n, n_images, ymax), layers, biases, ymax


def shares_of(case, n_workers: int):
    dense, layers, biases, ymax = case
    net = pack(layers, biases, ymax)
    indptr, indices, data = images_csr(dense)
    return net, build_shares(net, indptr, indices, data, make_partition(net, n_workers, "hypergraph"), n_workers)


def largest_by_search(fps, budget_mb, overhead_mb):
    """The most images per batch that fit every worker, by trying every size."""
    n = max(fp.n_images for fp in fps)
    fitting = [b for b in range(1, max(n, 1) + 1)
               if all(budget.peak_bytes(fp, b, overhead_mb) <= budget_mb * 2**20 for fp in fps)]
    return max(fitting) if fitting else None


@pytest.mark.parametrize("n_workers", [1, 3, 7])
def test_chosen_batch_fits_the_budget_and_is_the_largest(n_workers):
    _, shares = shares_of(random_case(n_workers, n_images=60), n_workers)
    fps = [budget.footprint(s) for s in shares]
    n = fps[0].n_images
    smallest = max(budget.peak_bytes(fp, 1, 0) for fp in fps) / 2**20
    largest = max(budget.peak_bytes(fp, n, 0) for fp in fps) / 2**20
    tried = 0
    for budget_mb in np.linspace(smallest, largest * 1.1, 25):
        want = largest_by_search(fps, budget_mb, 0)
        assert want is not None  # one image fits from the smallest budget up
        got = budget.batch_size_for(shares, budget_mb, overhead_mb=0)
        assert got == (None if want >= n else want), budget_mb
        if got is not None:
            assert all(budget.peak_bytes(fp, got, 0) <= budget_mb * 2**20 for fp in fps)
            assert any(budget.peak_bytes(fp, got + 1, 0) > budget_mb * 2**20 for fp in fps)
            tried += 1
    assert tried >= 5  # budgets that ask for real batches
    with pytest.raises(budget.MemoryBudgetError, match="even with one image per batch"):
        budget.batch_size_for(shares, smallest * 0.999, overhead_mb=0)


def test_footprint_counts_what_the_worker_holds():
    _, shares = shares_of(random_case(11), 3)
    for s in shares:
        fp = budget.footprint(s)
        assert fp.in_rows == max(a.shape[0] for a in s.in_neurons) + (2 * 3 if s.worker == 0 else 2)
        assert fp.out_rows == max(a.shape[0] for a in s.out_neurons) + 2
        assert fp.n_images == s.active.shape[0] + s.saturated.shape[0]
        # the share's arrays: what its stored form holds, give or take the npz headers
        assert fp.share_bytes <= len(s.to_bytes()) <= fp.share_bytes + 200 * 40


def test_batches_cover_every_image_once_and_keep_their_size():
    from fsd_runtime.worker import split_batches

    active, saturated = np.array([0, 2, 3, 5, 8, 9]), np.array([1, 6])
    parts = split_batches(active, saturated, 3)
    assert [(a.tolist(), p.tolist()) for a, p in parts] == [([0, 2], [1]), ([3, 5], [6]), ([8, 9], [])]
    assert [(a.tolist(), p.tolist()) for a, p in split_batches(active, saturated, None)] == \
        [(active.tolist(), saturated.tolist())]


@pytest.mark.parametrize("seed", range(6))
def test_a_small_budget_runs_in_batches_bit_identical_to_the_reference(seed):
    n_workers = 2 + seed % 4
    for attempt in range(20):  # a case where batching lowers the peak (random nets may have no such worker)
        case = random_case(1000 * seed + attempt, n=int(8 + 5 * seed), n_layers=3 + seed % 3, n_images=30)
        net, shares = shares_of(case, n_workers)
        fps = [budget.footprint(s) for s in shares]
        # the smallest budget that fits one image a batch on every worker
        budget_mb = max(budget.peak_bytes(fp, 1) for fp in fps) / 2**20
        if max(budget.peak_bytes(fp, None) for fp in fps) > budget_mb * 2**20:
            break
    else:
        pytest.fail("no random case where batching lowers the peak")
    want = reference(sp.csr_matrix(case[0]), *case[1:])
    result = run_distributed(net, images_csr(case[0]), n_workers, launcher={"kind": "thread"},
                             worker_memory_mb=budget_mb, owners=make_partition(net, n_workers, "hypergraph"))
    assert_bit_identical(result.activations, want, f"seed {seed}")
    serial = fsd_kernels.infer(*images_csr(case[0]), net)
    assert_bit_identical(result.activations, sp.csr_matrix((serial.data, serial.indices, serial.indptr),
                                                           shape=want.shape))
    chosen = budget.batch_size_for(shares, budget_mb)
    assert chosen is not None
    for m in result.worker_metrics:
        assert m["batches"] == -(-fps[0].n_images // chosen) >= 2
        assert m["batch_size"] <= chosen and m["memory_budget_mb"] == budget_mb
        assert m["memory_estimate_kb"] * 1024 <= (budget_mb - budget.WORKER_OVERHEAD_MB) * 2**20


def test_forked_workers_under_a_budget_report_their_own_memory():
    ds = model.synthetic(256, 6, 300, seed=3)
    net = ds.network.pack()
    owners = make_partition(net, 4, "hypergraph")
    shares = build_shares(net, *ds.images.arrays, owners, 4)
    budget_mb = max(budget.peak_bytes(budget.footprint(s), 50) for s in shares) / 2**20
    result = run_distributed(net, ds.images.arrays, 4, launcher={"kind": "fork"}, owners=owners,
                             worker_memory_mb=budget_mb)
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    a = result.activations
    assert np.array_equal(a.indptr, serial.indptr) and np.array_equal(a.indices, serial.indices)
    assert np.array_equal(a.data.view(np.uint32), serial.data.view(np.uint32))
    for m in result.worker_metrics:
        assert m["batches"] >= 2
        assert m["peak_growth_kb"] == m["peak_rss_kb"] - m["start_rss_kb"] >= 0
        assert 0 < m["uss_kb"] <= m["pss_kb"] <= m["peak_rss_kb"]
        if m["worker"]:  # forked: it started with its parent's pages, most of its peak
            assert m["start_rss_kb"] > m["peak_growth_kb"]


def test_a_budget_one_image_cannot_fit_is_refused_before_launch(tmp_path):
    ds = model.synthetic(128, 3, 20, seed=1)
    net = ds.network.pack()
    before = set(os.listdir(tmp_path))
    with pytest.raises(budget.MemoryBudgetError, match=r"worker \d+ needs about \d+ MB even with one image"):
        run_distributed(net, ds.images.arrays, 2, launcher={"kind": "thread"}, worker_memory_mb=150)
    # the CLI: exit 2, one line naming the option, nothing left in its $TMPDIR
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "run", "--synthetic", "128x3", "--images", "20",
                          "--workers", "2", "--worker-memory-mb", "150"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "--worker-memory-mb: worker" in out.stderr and "even with one image per batch" in out.stderr
    assert "Traceback" not in out.stderr
    assert set(os.listdir(tmp_path)) == before
    bad = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "run", "--worker-memory-mb", "0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--worker-memory-mb" in bad.stderr and "Traceback" not in bad.stderr


# --- timeouts ---

def test_timeouts_follow_the_formula():
    t = budget.timeouts(layers=120, neurons=16384, edges_per_layer=16384 * 32, images=10000, workers=84, depth=7,
                        cores=2, fresh_processes=False)
    layer = 5e-9 * 10000 * (16384 * 32 + 2 * 16384) / 84 * 42
    assert t.layer_s == pytest.approx(layer)
    assert t.receive == np.ceil(8 * layer) > 60
    assert t.startup_s == pytest.approx(5.0 * 7)
    assert t.run == max(900, np.ceil(2 * (35 + 2 * 120 * layer) + t.receive))
    # fresh local processes: each pays its imports, the cores shared
    p = budget.timeouts(layers=120, neurons=1024, edges_per_layer=1024 * 32, images=10000, workers=64, depth=6,
                        cores=2, fresh_processes=True)
    assert p.startup_s == pytest.approx(5.0 * 6 + 4.0 * 64 / 2)
    # small work: the former fixed defaults are the floors; on Lambda (cores None) no contention
    small = budget.timeouts(layers=4, neurons=64, edges_per_layer=64, images=10, workers=2, depth=2, cores=None,
                            fresh_processes=False)
    assert (small.receive, small.run) == (60.0, 900.0)
    # more work, more time; never beyond an event's day
    more = budget.timeouts(layers=120, neurons=16384, edges_per_layer=16384 * 32, images=20000, workers=84, depth=7,
                           cores=2, fresh_processes=False)
    assert more.receive > t.receive and more.run > t.run
    huge = budget.timeouts(layers=1920, neurons=65536, edges_per_layer=65536 * 32, images=60000, workers=8, depth=3,
                           cores=1, fresh_processes=True)
    assert huge.receive <= 86400 and huge.run == 86400


def test_explicit_timeouts_win_and_defaults_come_from_the_work(monkeypatch):
    from fsd_runtime.worker import ThreadLauncher

    seen = []
    real = ThreadLauncher.launch

    def spy(self, events):
        seen.extend(e.to_dict() for e in events if e.worker_id == 0)
        return real(self, events)

    monkeypatch.setattr(ThreadLauncher, "launch", spy)
    ds = model.synthetic(64, 3, 10, seed=2)
    net = ds.network.pack()
    run_distributed(net, ds.images.arrays, 2, launcher={"kind": "thread"}, receive_timeout=7, run_timeout=70)
    run_distributed(net, ds.images.arrays, 2, launcher={"kind": "thread"})
    auto = budget.run_timeouts(net, 10, 2, 2, "thread")
    assert (seen[0]["receive_timeout"], seen[0]["run_timeout"]) == (7, 70)
    assert (seen[1]["receive_timeout"], seen[1]["run_timeout"]) == (auto.receive, auto.run) == (60.0, 900.0)


@pytest.mark.parametrize("launcher", ["thread", "fork"])
def test_84_local_workers_need_no_timeout_flag(launcher):
    ds = model.synthetic(256, 4, 200, seed=5)
    net = ds.network.pack()
    result = run_distributed(net, ds.images.arrays, 84, launcher={"kind": launcher}, partition="contiguous")
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    a = result.activations
    assert np.array_equal(a.indptr, serial.indptr) and np.array_equal(a.data.view(np.uint32),
                                                                      serial.data.view(np.uint32))
    assert len(result.worker_metrics) == 84


# --- loading a share ---

def test_a_share_read_from_its_file_is_parsed_as_read_without_a_second_copy(tmp_path):
    import tracemalloc

    from fsd_runtime.plan import WorkerShare
    from fsd_runtime.storage import LocalStorage

    ds = model.synthetic(512, 24, 50, seed=4)
    net = ds.network.pack()
    share = build_shares(net, *ds.images.arrays, np.zeros((24, 512), np.int64), 1)[0]
    store = LocalStorage(str(tmp_path))
    store.put("share.npz", share.to_bytes())
    peaks = {}
    for how in ("bytes", "file"):
        tracemalloc.start()
        if how == "bytes":
            got = WorkerShare.from_bytes(store.get("share.npz"))
        else:
            with store.open("share.npz") as f:
                got = WorkerShare.from_bytes(f)
        held, peaks[how] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        for name in ("colptr", "rowidx", "vals", "bias", "in_neurons", "out_neurons"):
            assert all(np.array_equal(a, b) for a, b in zip(getattr(got, name), getattr(share, name)))
        assert np.array_equal(got.x_data, share.x_data) and np.array_equal(got.active, share.active)
        del got
    size = len(share.to_bytes())
    assert peaks["bytes"] > 1.9 * size  # the bytes and the arrays at once
    assert peaks["file"] < 1.2 * size   # the arrays, and one read buffer
    with pytest.raises(Exception, match="no stored object"):
        store.open("missing.npz")


def test_the_local_default_budget_counts_a_shared_overhead_once(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    8192000 kB\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                         *a, **k))
    available = 8192000 / 1024
    assert budget.default_worker_memory_mb(84, "process") == pytest.approx(available / 84)
    for kind in ("fork", "thread"):
        got = budget.default_worker_memory_mb(84, kind)
        assert got == pytest.approx((available - budget.WORKER_OVERHEAD_MB) / 84 + budget.WORKER_OVERHEAD_MB)
        assert 84 * (got - budget.WORKER_OVERHEAD_MB) + budget.WORKER_OVERHEAD_MB == pytest.approx(available)
    assert budget.default_worker_memory_mb(84, "lambda") is None
