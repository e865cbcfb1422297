"""fsd_kernels vs scipy.sparse vs SuiteSparse:GraphBLAS, side by side, on five rows.

Usage: python bench/compare.py [--json] [--threads T] [--repeats R] [--images K] [--rows ROWS]

Rows (``--rows`` picks some; all five by default):

- ``official``: the embedded official 1024x120 network on the first K official images, each tool as
  its users would run it (ours with its exact shortcuts; scipy and GraphBLAS layer by layer).
- ``early-exit``: the same, with scipy and GraphBLAS given the exact early exit ours has: stop when
  every live image is saturated (all ymax) and every remaining layer keeps saturation (each tool
  finds that per layer on an all-ymax probe, before timing).
- ``early-exit-no-twins``: the same, ours without its twin shortcut (``infer(twins=False)``):
  computing output neurons with equal W column and bias once is an algorithmic shortcut that
  neither baseline takes, so this row shows the figure without it.
- ``no-shortcuts``: ours with every exact shortcut off (``infer(shortcuts=False)``: no dead
  columns, no parking, no zero-row skip, no twins) against the baselines of ``official``.
- ``random``: an unstructured network, 4096 neurons x 60 layers, 32 inputs per neuron at random
  rows, weights N(0, 2/32) of both signs, a uniform bias per neuron in [-0.05, 0.05], and 2,000
  real-valued images (25% of inputs set, uniform in [0, 1)): images neither die nor saturate
  (about half of every row stays nonzero), so no shortcut applies.

Every tool computes the reference semantics (bias on the numeric nonzeros of the float32 sum Y W
in ascending k, ReLU, clip). On the random row that takes extra steps: scipy sorts each product's
rows (its next product sums in stored order) and GraphBLAS gets a ``valuene 0`` select before the
bias (it keeps sums that cancel to 0). On the official net every partial sum is exact and no sum
cancels, so there the baselines run as their users would, without those steps. Final activations
are hashed and compared on every row.

Every contender runs in its own fresh Python process (so its peak RSS is
its own; tracemalloc would miss numba's and GraphBLAS's allocations). Each
process loads the data, prepares its matrices (not timed), runs once to warm
up (numba compiles, caches fill), then times R full inferences and reports
the median. Peak memory is ``ru_maxrss`` of that process; ``extra_rss_mb``
is how far the peak rose above the RSS right before the timed runs, which is
the inference's own working memory. scipy's sparse product has no threads;
fsd_kernels and GraphBLAS get ``--threads`` each. ``cpu_seconds`` (process
CPU time, all threads) is reported too: on a shared, loaded machine it moves
far less than wall time. GraphBLAS's OpenMP threads run with
``OMP_WAIT_POLICY=PASSIVE`` unless the caller set it: with the default
spin-waiting, 2 threads on a 2-core machine that other work shares ran
20-30 times slower than 1 thread or 2 passive ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

CONTENDERS = ("ours", "ours-notwins", "ours-noshortcuts", "scipy", "scipy-exit", "graphblas", "graphblas-exit")
#: row -> (dataset, ours, the baselines it is compared with)
ROWS = {
    "official": ("official", "ours", ("scipy", "graphblas")),
    "early-exit": ("official", "ours", ("scipy-exit", "graphblas-exit")),
    "early-exit-no-twins": ("official", "ours-notwins", ("scipy-exit", "graphblas-exit")),
    "no-shortcuts": ("official", "ours-noshortcuts", ("scipy", "graphblas")),
    "random": ("random", "ours", ("scipy", "graphblas")),
}
RANDOM_SHAPE = dict(n_neurons=4096, n_layers=60, n_images=2000, degree=32)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_dataset(n_neurons, n_layers, n_images, degree, seed=1):
    """The ``random`` row's network and images (see the module notes); no golden categories."""
    import scipy.sparse as sp

    from fsd_runtime import model

    rng = np.random.default_rng(seed)
    layers, biases = [], []
    for _ in range(n_layers):
        rows = np.concatenate([rng.choice(n_neurons, degree, replace=False) for _ in range(n_neurons)])
        cols = np.repeat(np.arange(n_neurons), degree)
        vals = (rng.standard_normal(rows.size) * np.sqrt(2.0 / degree)).astype(np.float32)
        layers.append(sp.csr_matrix((vals, (rows, cols)), shape=(n_neurons, n_neurons)))
        biases.append(rng.uniform(-0.05, 0.05, n_neurons).astype(np.float32))
    x = sp.random(n_images, n_neurons, density=0.25, format="csr", random_state=seed + 1, dtype=np.float32)
    x.data[:] = rng.uniform(0, 1, x.nnz).astype(np.float32)
    x.sort_indices()
    images = model.Csr(x.indptr.astype(np.int64), x.indices.astype(np.int32), x.data, x.shape)
    name = "random-{n_neurons}x{n_layers}, {n_images} real-valued images".format(
        n_neurons=n_neurons, n_layers=n_layers, n_images=n_images)
    return model.Dataset(name, model.Network.from_layers(layers, biases, ymax=32.0), images, None)


def needs_reference_order(ds) -> bool:
    """Whether a baseline must take the extra steps the reference semantics need on this data
    (scipy: sort each product's rows, so the next sums run in ascending k; GraphBLAS: drop
    cancelled sums before the bias). Not on the official nets, where every partial sum is exact
    and no sum cancels: there each tool runs as its users would, and the final hashes prove the
    same bits."""
    return ds.categories is None  # the random row's data (the official data has its categories)


def _ymax(ds) -> np.float32:
    return np.float32(getattr(ds.network, "ymax", 32.0))


def prepare_ours(ds, threads, shortcuts=True, twins=True):
    import fsd_kernels

    net = ds.network.pack()

    def run():
        result = fsd_kernels.infer(*ds.images.arrays, net, threads=threads, shortcuts=shortcuts, twins=twins)
        return result.indptr, result.indices, result.data

    return run


def prepare_ours_notwins(ds, threads):
    return prepare_ours(ds, threads, twins=False)


def prepare_ours_noshortcuts(ds, threads):
    return prepare_ours(ds, threads, shortcuts=False)


def _exit_from(keeps) -> list[bool]:
    """exit_from[l]: layers l.. all keep saturation (so an all-saturated Y may stop before l)."""
    out, ok = [False] * len(keeps), True
    for l in range(len(keeps) - 1, -1, -1):
        ok = ok and keeps[l]
        out[l] = ok
    return out


def prepare_scipy(ds, threads, early_exit=False):
    """CSR Y @ W (numeric zeros dropped by scipy), bias on those entries, ReLU, clip, drop zeros.

    scipy's product leaves each row's columns unsorted and the next product sums in stored
    order, so each layer sorts them: the reference sums in ascending input neuron (on the
    official nets every partial sum is exact and the order never shows; on others it does)."""
    import scipy.sparse as sp

    n = ds.network.n_neurons
    ymax = _ymax(ds)
    weights = [sp.csr_matrix((w.data, w.indices, w.indptr), shape=(n, n)) for w in ds.network.layers]
    biases = ds.network.biases
    y0 = sp.csr_matrix((ds.images.data, ds.images.indices, ds.images.indptr), shape=ds.images.shape)

    exact_order = needs_reference_order(ds)

    def layer(y, w, b):
        z = y @ w
        if exact_order:  # scipy sums in the order Y's columns are stored: ascending k needs sorted rows
            z.sort_indices()
        z.data += b[z.indices]
        np.clip(z.data, 0, ymax, out=z.data)
        z.eliminate_zeros()
        return z

    probe = sp.csr_matrix(np.full((1, n), ymax, np.float32))
    exit_from = _exit_from([bool(np.all(layer(probe, w, b).toarray() == ymax)) for w, b in zip(weights, biases)])

    def run():
        y = y0
        for l, (w, b) in enumerate(zip(weights, biases)):
            if early_exit and exit_from[l]:
                counts = np.diff(y.indptr)
                if np.all((counts == 0) | (counts == n)) and np.all(y.data == ymax):
                    break
            y = layer(y, w, b)
        y.sort_indices()
        return y.indptr, y.indices, y.data

    return run


def prepare_scipy_exit(ds, threads):
    return prepare_scipy(ds, threads, early_exit=True)


def prepare_graphblas(ds, threads, early_exit=False):
    """GraphBLAS layer: plus_times mxm, numeric zeros dropped (valuene 0), bias, ReLU, clip.

    Every operator is typed FP32 with FP32 scalars: an untyped Python float
    makes GraphBLAS work in FP64 (other rounding, and three times slower).
    GraphBLAS keeps an entry whose sum cancels to 0 (structural); the select
    drops it so that the bias goes on numeric nonzeros only, as the reference.
    """
    import graphblas as gb
    from graphblas import agg, binary, select, semiring

    gb.ss.config["nthreads"] = threads
    n = ds.network.n_neurons
    weights = [gb.Matrix.from_csr(w.indptr, w.indices, w.data, nrows=n, ncols=n, dtype="FP32")
               for w in ds.network.layers]
    biases = []
    for b in ds.network.biases:
        if np.all(b == b[0]):
            biases.append(np.float32(b[0]))
        else:
            biases.append(gb.Vector.from_dense(b, dtype="FP32").diag())
    ymax = _ymax(ds)
    y0 = gb.Matrix.from_csr(ds.images.indptr, ds.images.indices, ds.images.data,
                            nrows=ds.images.shape[0], ncols=n, dtype="FP32")

    exact_order = needs_reference_order(ds)

    def layer(y, w, b):
        z = y.mxm(w, semiring.plus_times["FP32"]).new()
        if exact_order:  # drop the sums that cancelled to 0: no bias there
            z << select.valuene(z, 0)
        if isinstance(b, np.float32):
            z << z.apply(binary.plus["FP32"], right=b)
        else:
            z << z.mxm(b, semiring.plus_plus["FP32"])
        z << select.valuegt(z, 0)
        z << z.apply(binary.min["FP32"], right=ymax)
        return z

    probe = gb.Matrix.from_dense(np.full((1, n), ymax, np.float32), dtype="FP32")
    exit_from = _exit_from([bool(np.all(layer(probe, w, b).to_dense(fill_value=0) == ymax))
                            for w, b in zip(weights, biases)])

    def run():
        y = y0
        for l, (w, b) in enumerate(zip(weights, biases)):
            if early_exit and exit_from[l]:
                rows = y.reduce_rowwise(agg.count).new()
                if rows.reduce(binary.min).new().value in (None, n) and y.select("==", ymax).new().nvals == y.nvals:
                    break
            y = layer(y, w, b)
        return y.to_csr()

    return run


def prepare_graphblas_exit(ds, threads):
    return prepare_graphblas(ds, threads, early_exit=True)


def load(dataset: str, images: int | None):
    from fsd_runtime import model

    if dataset == "random":
        return random_dataset(**RANDOM_SHAPE)
    ds = model.embedded()
    if images is not None and images < ds.images.shape[0]:
        ds = model.Dataset(ds.name, ds.network, ds.images.rows(0, images),
                           ds.categories[ds.categories < images])
    return ds


def measure(name: str, dataset: str, threads: int, repeats: int, images: int | None) -> dict:
    """Run one contender in this process; the parent runs each in a fresh process."""
    ds = load(dataset, images)
    run = globals()["prepare_" + name.replace("-", "_")](ds, threads)
    run()
    rss_before = _rss_mb()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        activations = run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    edges = ds.images.shape[0] * ds.network.nnz
    indptr, indices, data = activations
    categories = np.flatnonzero(np.diff(indptr))
    digest = hashlib.sha256()
    for array, dtype in ((indptr, np.int64), (indices, np.int32), (data, np.float32)):
        digest.update(np.ascontiguousarray(array, dtype).tobytes())
    return {
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_times),
        "edges_per_second": edges / seconds,
        "golden_match": None if ds.categories is None else bool(np.array_equal(categories, ds.categories)),
        "activations_sha256": digest.hexdigest(),
        "categories": int(len(categories)),
        "threads": 1 if name.startswith("scipy") else threads,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "extra_rss_mb": round(max(0.0, _peak_rss_mb() - rss_before), 1),
        "runs": [round(t, 4) for t in times],
    }


def run_contender(name: str, dataset: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--dataset", dataset,
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    if args.images:
        cmd += ["--images", str(args.images)]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{name} on {dataset} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median)")
    p.add_argument("--images", type=int, help="only the first K official images (default all 10,000)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows out of {', '.join(ROWS)}")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--dataset", choices=("official", "random"), default="official", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        print(json.dumps(measure(args.contender, args.dataset, args.threads, args.repeats, args.images)))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    runs: dict[tuple[str, str], dict] = {}
    for row in rows:   # every (dataset, contender) once, in the order the rows need them
        dataset, ours, others = ROWS[row]
        for name in (ours, *others):
            if (dataset, name) not in runs:
                runs[(dataset, name)] = run_contender(name, dataset, args)
    out = {"threads": args.threads, "repeats": args.repeats, "rows": {}}
    for row in rows:
        dataset, ours, others = ROWS[row]
        mine = runs[(dataset, ours)]
        best = min(others, key=lambda name: runs[(dataset, name)]["seconds"])
        out["rows"][row] = {
            "dataset": "random" if dataset == "random" else
                       "graphchallenge-1024x120, first %s official images" % (args.images or 10000),
            "ours": ours, "ours_seconds": mine["seconds"],
            "baselines": {name: runs[(dataset, name)]["seconds"] for name in others},
            "faster_baseline": best,
            "speedup_vs_faster": runs[(dataset, best)]["seconds"] / mine["seconds"],
            "bit_identical": all(runs[(dataset, name)]["activations_sha256"] == mine["activations_sha256"]
                                 for name in others),
        }
    out["contenders"] = {f"{d}/{n}": r for (d, n), r in runs.items()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.threads} threads (scipy: 1), median of {args.repeats} runs, each in a fresh process")
        print(f"{'dataset/contender':32} {'seconds':>9} {'CPU s':>7} {'Gedges/s':>9} {'golden':>7} "
              f"{'peak RSS MB':>12} {'extra MB':>9}")
        for (d, n), r in runs.items():
            print(f"{d + '/' + n:32} {r['seconds']:9.3f} {r['cpu_seconds']:7.3f} {r['edges_per_second'] / 1e9:9.2f} "
                  f"{str(r['golden_match']):>7} {r['peak_rss_mb']:12.1f} {r['extra_rss_mb']:9.1f}")
        for row, r in out["rows"].items():
            print(f"{row:13} {r['ours']} {r['ours_seconds']:.3f} s vs {r['faster_baseline']} "
                  f"{r['baselines'][r['faster_baseline']]:.3f} s: {r['speedup_vs_faster']:.1f}x, "
                  f"bit-identical: {r['bit_identical']}")
    ok = all(r["golden_match"] is not False for r in runs.values()) and \
        all(r["bit_identical"] for r in out["rows"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
