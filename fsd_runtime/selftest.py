"""``python -m fsd_runtime.selftest [--json]``: the quick check to run inside a fresh Lambda.

With only a layer's ``python/`` on the path, it runs the first thousand
official images (embedded in fsd_runtime) through all 120 layers and says
whether the compiled kernels were used (``native``), whether numba got
imported (``numba_loaded``; it must not be on the Lambda path), whether the
categories match the official ones (``golden_match``), and the cold start:
seconds from the process start until the kernels are loaded and a first
challenge-sized layer (1024 neurons, 100 images) is computed. Decoding the
embedded data and the golden run are timed apart (``load_seconds``,
``infer_seconds``): they are this check's work, not a worker's start.
``cold_start_cpu_seconds`` is the CPU time of that cold start (user +
system): the wall clock also counts waiting for a busy machine.

``handler`` runs the same check as a Lambda function, so a layer can be
proved under the Lambda runtime interface before any other handler exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: Images checked by default: the first 1000 hold 11 golden categories; quick even under qemu.
DEFAULT_IMAGES = 1000


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(uptime - started, 0.0)
    except (OSError, ValueError, IndexError):
        return None


def first_layer(n_images: int = 100) -> int:
    """One challenge-sized layer (1024 neurons, 32 weights a neuron) through the kernels; its nnz."""
    import fsd_kernels
    from fsd_runtime import model

    data = model.synthetic(1024, 1, n_images)
    w, bias = data.network.layers[0], data.network.biases[0]
    _, indices, _ = fsd_kernels.layer(*data.images.arrays, *w.arrays, bias)
    return int(indices.shape[0])


def run(n_images: int = DEFAULT_IMAGES) -> dict:
    """Cold start to the first layer, then the first ``n_images`` official images; the report dict."""
    if not 1 <= n_images <= 10_000:
        raise ValueError(f"n_images must be in 1..10000 (the embedded images), got {n_images}")
    start = time.perf_counter()
    import numpy as np

    import fsd_kernels
    from fsd_runtime import model

    imported = time.perf_counter()
    first_layer()
    cold_start = process_age_seconds()
    cold_start_cpu = sum(os.times()[:2])
    first = time.perf_counter()
    data = model.embedded()
    images = data.images.rows(0, n_images)
    golden = data.categories[data.categories < n_images]
    net = data.network.pack()
    loaded = time.perf_counter()
    result = fsd_kernels.infer(*images.arrays, net, threads=1)
    done = time.perf_counter()
    return {
        "native": fsd_kernels.backend == "native",
        "backend": fsd_kernels.backend,
        "numba_loaded": "numba" in sys.modules,
        "codec_compressor": "zstd" if fsd_kernels.codec.zstandard is not None else "zlib",
        "golden_match": bool(np.array_equal(result.categories, golden)),
        "images": n_images,
        "categories": len(golden),
        "cold_start_seconds": None if cold_start is None else round(cold_start, 3),
        "cold_start_cpu_seconds": round(cold_start_cpu, 3),
        "import_seconds": round(imported - start, 3),
        "first_layer_seconds": round(first - imported, 3),
        "load_seconds": round(loaded - first, 3),
        "infer_seconds": round(done - loaded, 3),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }


def handler(event, context) -> dict:
    """Lambda entry point: ``{"images": N}`` (optional) -> the report dict."""
    n_images = DEFAULT_IMAGES
    if isinstance(event, dict) and "images" in event:
        n_images = event["images"]
        if not isinstance(n_images, int) or isinstance(n_images, bool):
            raise ValueError(f"event 'images' must be an integer, got {n_images!r}")
    return run(n_images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsd_runtime.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images to check (1..10000)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--require-native", action="store_true",
                        help="fail unless the compiled kernels ran and numba was never imported")
    args = parser.parse_args(argv)
    try:
        report = run(args.images)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    ok = report["golden_match"] and (not args.require_native
                                     or (report["native"] and not report["numba_loaded"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
