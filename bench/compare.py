"""fsd_kernels vs scipy.sparse vs SuiteSparse:GraphBLAS on the same Graph Challenge run.

Usage: python bench/compare.py [--json] [--threads T] [--repeats R] [--images K]

Every contender runs in its own fresh Python process (so its peak RSS is
its own; tracemalloc would miss numba's and GraphBLAS's allocations) on the
embedded official 1024x120 network and the first K official images. Each
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

CONTENDERS = ("ours", "scipy", "graphblas")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_ours(ds, threads):
    import fsd_kernels

    net = ds.network.pack()

    def run():
        result = fsd_kernels.infer(*ds.images.arrays, net, threads=threads)
        return result.indptr, result.indices, result.data

    return run


def prepare_scipy(ds, threads):
    """The seed's layer: CSR Y @ W, bias on the structural nonzeros, ReLU, clip, drop zeros."""
    import scipy.sparse as sp

    n = ds.network.n_neurons
    weights = [sp.csr_matrix((w.data, w.indices, w.indptr), shape=(n, n)) for w in ds.network.layers]
    biases = ds.network.biases
    y0 = sp.csr_matrix((ds.images.data, ds.images.indices, ds.images.indptr), shape=ds.images.shape)

    def run():
        y = y0
        for w, b in zip(weights, biases):
            z = y @ w
            z.data += b[z.indices]
            np.clip(z.data, 0, 32, out=z.data)
            z.eliminate_zeros()
            y = z
        y.sort_indices()
        return y.indptr, y.indices, y.data

    return run


def prepare_graphblas(ds, threads):
    """GraphBLAS layer: plus_times mxm, bias applied to the structural entries only, ReLU, clip.

    Every operator is typed FP32 with FP32 scalars: an untyped Python float
    makes GraphBLAS work in FP64 (other rounding, and three times slower).
    """
    import graphblas as gb
    from graphblas import binary, select, semiring

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
    ymax = np.float32(32)
    y0 = gb.Matrix.from_csr(ds.images.indptr, ds.images.indices, ds.images.data,
                            nrows=ds.images.shape[0], ncols=n, dtype="FP32")

    def run():
        y = y0
        for w, b in zip(weights, biases):
            z = y.mxm(w, semiring.plus_times["FP32"]).new()
            if isinstance(b, np.float32):
                z << z.apply(binary.plus["FP32"], right=b)
            else:
                z << z.mxm(b, semiring.plus_plus["FP32"])
            z << select.valuegt(z, 0)
            z << z.apply(binary.min["FP32"], right=ymax)
            y = z
        return y.to_csr()

    return run


def measure(name: str, threads: int, repeats: int, images: int | None) -> dict:
    """Run one contender in this process; the parent runs each in a fresh process."""
    from fsd_runtime import model

    ds = model.embedded()
    if images is not None and images < ds.images.shape[0]:
        ds = model.Dataset(ds.name, ds.network, ds.images.rows(0, images),
                           ds.categories[ds.categories < images])
    run = globals()[f"prepare_{name}"](ds, threads)
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
        "golden_match": bool(np.array_equal(categories, ds.categories)),
        "activations_sha256": digest.hexdigest(),
        "categories": int(len(categories)),
        "threads": 1 if name == "scipy" else threads,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "extra_rss_mb": round(max(0.0, _peak_rss_mb() - rss_before), 1),
        "runs": [round(t, 4) for t in times],
    }


def run_contender(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--contender", name, "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    if args.images:
        cmd += ["--images", str(args.images)]
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender (median)")
    p.add_argument("--images", type=int, help="only the first K official images (default all 10,000)")
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        print(json.dumps(measure(args.contender, args.threads, args.repeats, args.images)))
        return 0
    out = {name: run_contender(name, args) for name in CONTENDERS}
    best_other = min(out["scipy"]["seconds"], out["graphblas"]["seconds"])
    out["speedup_vs_best"] = best_other / out["ours"]["seconds"]
    for name in CONTENDERS:
        out[name]["bit_identical_to_ours"] = out[name]["activations_sha256"] == out["ours"]["activations_sha256"]
    out["threads"] = args.threads
    out["dataset"] = "graphchallenge-1024x120, first %s official images" % (args.images or 10000)
    if args.json:
        print(json.dumps(out))
    else:
        print(out["dataset"] + f", {args.threads} threads (scipy: 1), median of {args.repeats} runs")
        print(f"{'':10} {'seconds':>9} {'CPU s':>7} {'Gedges/s':>9} {'golden':>7} {'peak RSS MB':>12} "
              f"{'extra MB':>9}")
        for name in CONTENDERS:
            r = out[name]
            print(f"{name:10} {r['seconds']:9.3f} {r['cpu_seconds']:7.3f} {r['edges_per_second'] / 1e9:9.1f} "
                  f"{str(r['golden_match']):>7} {r['peak_rss_mb']:12.1f} {r['extra_rss_mb']:9.1f}")
        print(f"speed-up of ours over the best other: {out['speedup_vs_best']:.1f}x")
        same = [name for name in CONTENDERS[1:] if out[name]["bit_identical_to_ours"]]
        print(f"final activations bit-identical to ours: {', '.join(same) or 'none'}")
    ok = all(out[name]["golden_match"] for name in CONTENDERS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
