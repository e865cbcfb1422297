"""Traffic and local wall time of the distributed runtime on the official 1024x120 net, 10k images.

    python bench/traffic.py [--workers 8] [--launcher process|thread] [--repeat 3] [--json]

For each partitioner: the static volume (rows crossing workers, all layers
and layers 1-19), and one real run over the local channel: encoded bytes,
messages, chunks and requests beside the seed's (104.1 MB, 6,774
messages), whether the categories are the golden 337 and the result is
bit-identical to the serial run, worker start-up and run time (start-up =
launch until every worker has loaded its share, kernels and channel and
allocated its buffers; run = from then until the last worker finished), next
to the serial run's time, and the CPU seconds all workers spent in the run.
The machine is shared, so both are timed ``--repeat`` times, interleaved
(serial, distributed, serial, ...): the ratio of the best times and the
ratio of the medians are reported.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fsd_kernels
from fsd_runtime import model, partition
from fsd_runtime.coordinator import run_distributed

SEED_BYTES = 104.1e6
SEED_MESSAGES = 6774


def serial_seconds(ds, net) -> tuple[float, object]:
    start = time.perf_counter()
    result = fsd_kernels.infer(*ds.images.arrays, net)
    return time.perf_counter() - start, result


def identical(a, b) -> bool:
    return (np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data.view(np.uint32), b.data.view(np.uint32)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--launcher", default="process", choices=("process", "thread"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best and median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    ds = model.embedded()
    net = ds.network.pack()
    serial_s, serial = serial_seconds(ds, net)  # warm-up; every later serial run is timed
    serial_times = []
    report = {"dataset": ds.name, "images": int(ds.images.shape[0]), "workers": args.workers,
              "launcher": args.launcher, "backend": fsd_kernels.backend, "repeat": args.repeat,
              "seed": {"bytes": SEED_BYTES, "messages": SEED_MESSAGES}, "partitions": {}}
    for method in partition.METHODS:
        start = time.perf_counter()
        owners = partition.make_partition(net, args.workers, method)
        partition_s = time.perf_counter() - start
        volume = partition.volume(net, owners)
        run_times, startup_times, cpu_times, golden, exact = [], [], [], True, True
        for _ in range(args.repeat):
            serial_times.append(serial_seconds(ds, net)[0])
            result = run_distributed(net, ds.images.arrays, args.workers, owners=owners, partition=method,
                                     launcher={"kind": args.launcher}, batch_size=args.batch_size)
            run_times.append(result.timings["run_s"])
            startup_times.append(result.timings["startup_s"])
            cpu_times.append(result.timings.get("workers_cpu_s"))
            golden &= bool(np.array_equal(result.categories, ds.categories))
            exact &= identical(result.activations, serial)
        rows = result.metrics
        report["partitions"][method] = {
            "partition_seconds": partition_s,
            "volume_rows_all_layers": int(sum(volume["volume"])),
            "volume_rows_layers_1_19": int(sum(volume["volume"][1:20])),
            "volume_rows_per_layer": volume["volume"],
            "max_imbalance": max(volume["imbalance"]),
            "traffic": result.traffic,
            "rows_sent": int(sum(r["rows_sent"] for r in rows)),
            "nnz_sent": int(sum(r["nnz_sent"] for r in rows)),
            "layers_with_traffic": len({r["layer"] for r in rows if r["messages_sent"]}),
            "bytes_vs_seed": result.traffic["bytes"] / SEED_BYTES,
            "golden_match": golden,       # in every run
            "bit_identical": exact,
            "startup_seconds": float(np.median(startup_times)),
            "run_seconds_all": run_times,
            "run_seconds": min(run_times),
            "run_seconds_median": float(np.median(run_times)),
            "workers_cpu_seconds_all": cpu_times,  # CPU of all worker processes during the run
        }
    report["serial_seconds_all"] = serial_times
    report["serial_seconds"] = min(serial_times)
    report["serial_seconds_median"] = float(np.median(serial_times))
    for r in report["partitions"].values():
        r["run_vs_serial"] = r["run_seconds"] / report["serial_seconds"]
        r["median_run_vs_serial"] = r["run_seconds_median"] / report["serial_seconds_median"]
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"serial: best {report['serial_seconds']:.3f} s, median {report['serial_seconds_median']:.3f} s "
              f"of {len(serial_times)} ({fsd_kernels.backend} kernels); seed: {SEED_BYTES / 1e6:.1f} MB, "
              f"{SEED_MESSAGES} messages; run = best (median) of {args.repeat}")
        print(f"{'partition':<11}{'vol rows':>9}{'MB':>8}{'msgs':>6}{'chunks':>7}{'layers':>7}"
              f"{'start s':>8}{'run s':>14}{'x serial':>12}  exact")
        for method, r in report["partitions"].items():
            t = r["traffic"]
            print(f"{method:<11}{r['volume_rows_all_layers']:>9}{t['bytes'] / 1e6:>8.2f}{t['messages']:>6}"
                  f"{t['chunks']:>7}{r['layers_with_traffic']:>7}{r['startup_seconds']:>8.2f}"
                  f"{r['run_seconds']:>7.3f} ({r['run_seconds_median']:.3f})"
                  f"{r['run_vs_serial']:>5.1f} ({r['median_run_vs_serial']:.1f})  "
                  f"{r['bit_identical'] and r['golden_match']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
