"""Local start-up against the number of workers, per launcher kind.

    python bench/startup.py [--workers 8,20,42,84] [--launchers fork,process] [--images 10000] [--json]

Runs the official 1024x120 net on the embedded images with P local workers and reports the
coordinator's ``startup_seconds`` (launch of worker 0 until the last worker is ready: share
loaded, kernels loaded, channel up, loop built), the run without start-up, each worker's peak
RSS (VmHWM) and whether the result is bit-identical to the serial run. ``process`` starts every
worker as ``python -m fsd_runtime.worker`` (each imports numpy and loads the kernels); ``fork``
starts worker 0 so and forks every other from its tree parent after the kernels are loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="8,20,42,84")
    ap.add_argument("--launchers", default="fork,process")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import fsd_kernels
    from fsd_runtime import model
    from fsd_runtime.coordinator import run_distributed

    ds = model.embedded()
    images = ds.images.rows(0, args.images).arrays
    net = ds.network.pack()
    serial = fsd_kernels.infer(*images, net)
    rows = []
    for kind in args.launchers.split(","):
        for p in map(int, args.workers.split(",")):
            start = time.perf_counter()
            r = run_distributed(net, images, p, launcher={"kind": kind})
            a = r.activations
            exact = bool(np.array_equal(a.indptr, serial.indptr) and np.array_equal(a.indices, serial.indices)
                         and np.array_equal(a.data.view(np.uint32), serial.data.view(np.uint32)))
            rss = [m.get("peak_rss_kb") or 0 for m in r.worker_metrics]
            row = {"launcher": kind, "workers": p, "exact": exact, "startup_seconds": r.timings["startup_s"],
                   "run_seconds": r.timings["run_s"], "coordinator_seconds": time.perf_counter() - start,
                   "worker_peak_rss_mb_max": max(rss) / 1024, "load_average": os.getloadavg()[0]}
            rows.append(row)
            if not args.json:
                print(f"{kind:8} P={p:3} exact={exact} start-up {row['startup_seconds']:6.2f} s  run "
                      f"{row['run_seconds']:5.2f} s  peak RSS {row['worker_peak_rss_mb_max']:.0f} MB  "
                      f"load {row['load_average']:.1f}", flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
