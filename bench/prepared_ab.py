"""One run of a prepared synthetic model with P fork workers, for comparing two trees side by side.

    PYTHONPATH=TREE python bench/prepared_ab.py MODEL_DIR N P REFERENCE.npz

``MODEL_DIR`` is ``fsd_runtime.prepared.prepare`` of ``model.synthetic(N, 120, 10000, seed=0)``
(what ``bench/paper.py`` runs) for P workers; the run uses the queue channel's chunk limit and
the paper's Lambda memory for N, as ``bench/paper.py`` does. Prints one JSON line: start-up, the
run without start-up, the workers' CPU seconds in the run (``workers_cpu_s``), the largest worker
peak RSS, the traffic, and whether the final activations equal, bit for bit, those saved in
``REFERENCE.npz`` by the first call (which writes it). Alternate the trees (PYTHONPATH) call by
call: this machine is shared, so only runs made side by side compare.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

LAMBDA_MB = {1024: 1000, 4096: 1500, 16384: 2000, 65536: 4000}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    from fsd_runtime import budget, model
    from fsd_runtime.aws import billing
    from fsd_runtime.coordinator import run_distributed

    model_dir, n, p, reference = argv[0], int(argv[1]), int(argv[2]), argv[3]
    images = model.synthetic(n, 120, 10000, seed=0).images.rows(0, 10000).arrays
    here = budget.default_worker_memory_mb(p, "fork")
    memory = min(LAMBDA_MB.get(n, 2048), here) if here else LAMBDA_MB.get(n, 2048)
    r = run_distributed(None, images, p, channel={"kind": "local", "max_chunk_bytes": billing.queue_max_chunk_bytes(p)},
                        launcher={"kind": "fork"}, prepared=model_dir, worker_memory_mb=memory)
    a = r.activations
    same = None
    if os.path.exists(reference):
        with np.load(reference) as z:
            same = bool(np.array_equal(z["indptr"], a.indptr) and np.array_equal(z["indices"], a.indices)
                        and np.array_equal(z["data"].view(np.uint32), a.data.view(np.uint32)))
    else:
        np.savez(reference, indptr=a.indptr, indices=a.indices, data=a.data)
    print(json.dumps({
        "tree": os.environ.get("PYTHONPATH", ""), "neurons": n, "workers": p,
        "startup_s": round(r.timings["startup_s"], 2), "run_s": round(r.timings["run_s"], 2),
        "workers_cpu_s": round(r.timings.get("workers_cpu_s", -1.0), 2), "same_as_first": same,
        "peak_rss_mb": round(max(m.get("peak_rss_kb") or 0 for m in r.worker_metrics) / 1024),
        "messages": r.traffic["messages"], "bytes": r.traffic["bytes"], "load": round(os.getloadavg()[0], 1)}),
        flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
