"""How fsd_kernels' cost grows with N and L: synthetic challenge-like nets, one fresh process each.

Usage: python bench/scale.py [--json] [--images K] [--threads T] [--repeats R] [NxL ...]
(default sizes: 1024x120 4096x120 4096x480 16384x120)

Each size runs in its own Python process: it generates the seeded net and K
synthetic images (not timed), packs the net, warms up once, then times R
inferences (median). Peak RSS is that process's ``ru_maxrss`` (data, net and
kernels' blocks together); ``extra_rss_mb`` is how far it rose during the
timed runs, i.e. inference's own working memory; ``cpu_seconds`` is the
process CPU time of a run (all threads), steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_SIZES = ("1024x120", "4096x120", "4096x480", "16384x120")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_size(text: str) -> tuple[int, int]:
    try:
        n, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"sizes are NxL, e.g. 4096x480, got {text!r}") from None
    return n, layers


def measure(size: str, images: int, threads: int, repeats: int) -> dict:
    """One size in this process; the parent runs each size in a fresh process."""
    import fsd_kernels
    from fsd_runtime import model

    n, layers = parse_size(size)
    ds = model.synthetic(n, layers, images, seed=0)
    start = time.perf_counter()
    net = ds.network.pack()
    pack_seconds = time.perf_counter() - start
    result = fsd_kernels.infer(*ds.images.arrays, net, threads=threads)
    rss_before = _rss_mb()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fsd_kernels.infer(*ds.images.arrays, net, threads=threads)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    return {
        "size": size,
        "neurons": n,
        "layers": layers,
        "images": images,
        "input_nnz_per_image": ds.images.nnz / max(images, 1),
        "survivors": int(result.categories.size),
        "pack_seconds": pack_seconds,
        "seconds": seconds,
        "cpu_seconds": statistics.median(cpu_times),
        "edges_per_second": images * net.nnz / seconds,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "extra_rss_mb": round(max(0.0, _peak_rss_mb() - rss_before), 1),
        "threads": threads,
        "runs": [round(t, 4) for t in times],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", default=list(DEFAULT_SIZES), help="NxL sizes")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_process:
        print(json.dumps(measure(args.sizes[0], args.images, args.threads, args.repeats)))
        return 0
    rows = []
    for size in args.sizes:
        parse_size(size)
        cmd = [sys.executable, os.path.abspath(__file__), size, "--in-process", "--images", str(args.images),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{size} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout))
        if not args.json:
            r = rows[-1]
            if len(rows) == 1:
                print(f"{args.images} synthetic images, {args.threads} threads, median of {args.repeats} runs")
                print(f"{'size':>10} {'seconds':>8} {'CPU s':>7} {'Gedges/s':>9} {'survivors':>9} "
                      f"{'peak RSS MB':>12} {'extra MB':>9}")
            print(f"{r['size']:>10} {r['seconds']:8.3f} {r['cpu_seconds']:7.3f} {r['edges_per_second'] / 1e9:9.1f} "
                  f"{r['survivors']:9d} "
                  f"{r['peak_rss_mb']:12.1f} {r['extra_rss_mb']:9.1f}", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
