"""The seed paper's experiment matrix, run end to end on this machine, row by row beside the paper's.

    python bench/paper.py [--sizes 1024,4096] [--workers 8,12,20,42,62,84] [--channels queue,object]
                          [--images 10000] [--layers 120] [--launcher fork|process|thread] [--json] [--plot DIR]

The paper's table: bench/data/fsd-inference-results.csv (copied from the seed's results
spreadsheet, see bench/data/paper-README.md). For each size N and worker count P this prepares
the model once (``fsd_runtime.prepared.prepare``: partition and plans, streamed layer by layer;
``prepare_s`` in the row), runs the whole inference from it for each channel with P local worker
processes over the local channel (Unix sockets; the run's coordinator never holds the network),
checks the final activations against the serial ``fsd_kernels.infer`` bit for bit, and reports,
per channel:

- measured: wall time (run without start-up), start-up, each worker's compute / codec / waiting
  seconds (max and mean over workers), messages, chunks and bytes on the local wire, messages
  per round, each worker's peak RSS (VmHWM, read by the worker itself);
- modelled from exactly the chunks sent (``fsd_runtime.billing``, the AWS channels' own packing
  code): the bytes, requests (calls, as the paper counts them: queue: PublishBatch +
  ReceiveMessage; object: PUT + GET + LIST; ``usd`` prices the billed 64 KiB chunks) and $ of
  that channel (``fsd_runtime.cost``; worker durations: every term of ``cost.duration_terms``:
  measured CPU time of compute + codec slowed to the Lambda CPU share, the wait for each layer's
  slowest worker, one hop per layer with traffic, INIT, the launch tree's skew and the model
  download). ``usd`` is at AWS list prices (``cost.PRICES``), ``usd_seed_prices`` on the seed's
  own sheet (``cost.SEED_PRICES``: London prices, SNS bytes at $0.09/GB), the like-for-like
  figure beside the paper's $. ``usd`` /
  ``requests`` use the conservative assumptions (the seed's measured mean 0.516 s exchange per
  round; one message per ReceiveMessage; S3: each worker reads only its senders' objects, each
  of which arrives 0.516 s after its sender's measured, slowed compute (plus the launch-tree
  skew at the first receive), and the channel's polls, sentinel and poll lead are replayed
  against those arrivals), ``*_optimistic`` the other end (one poll, ten messages a
  ReceiveMessage). Lambda memory (``lambda_mb_modelled``):
  the smallest size holding the measured worker peak plus ``aws_clients_mb`` (measured here: what
  the handler, boto3 and its S3, SQS and SNS clients add to a fresh worker process) with a quarter
  to spare (``cost.fitting_memory_mb``); ``usd_at_paper_memory`` prices the paper's size.

Kernels (``--kernels``): ``native`` (default) builds the AOT module the Lambda layer ships
(``python -m fsd_kernels._build``, into a temporary directory) and every worker runs on it with
no numba loaded, as on Lambda, so the peak RSS is of Lambda's worker path; ``jit`` runs numba's
JIT kernels (~140 MB more per worker). Both give the same bits (tests/test_native.py).

Workers run within the paper's Lambda memory for N (and this machine's memory over P): the
runtime batches the images where buffers would not fit (``batches`` in the row). Timeouts are
the runtime's defaults, derived from the work. ``--save-runs DIR`` keeps each run's chunk log
and metrics; ``--reprice DIR`` prices them again without running. ``--no-parking`` runs without
the runtime's parking of saturated images (they are then computed and sent at every layer, as
in the paper's system; same bits): the figures without that shortcut.

Data: N = 1024 uses the official Graph Challenge images (embedded, first 10,000) on the
official net; other N use the package's challenge-like synthetic net and images
(``model.synthetic``), since the official larger files are not available offline. The queue
run cuts chunks at the queue channel's limit, the object run at the object channel's (one run
each). Bytes in the JSON are the modelled channel's bytes (base85 text + attributes on the
queue, object bodies on S3); ``local_bytes`` the chunk bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

PAPER_CSV = os.path.join(HERE, "data", "fsd-inference-results.csv")
PAPER_WORKERS = (8, 12, 20, 42, 62, 84)
PAPER_SIZES = (1024, 4096, 16384, 65536)
LAMBDA_MB = {1024: 1000, 4096: 1500, 16384: 2000, 65536: 4000}


def paper_rows() -> dict[tuple[str, int, int], dict]:
    """The paper's rows by (channel, neurons, workers); the RANDOM-placement row is left out."""
    rows = {}
    with open(PAPER_CSV) as f:
        for r in csv.DictReader(f):
            if r["config"].endswith("_RANDOM"):
                continue
            num = lambda k: float(r[k]) if r[k] not in ("", None) else None  # noqa: E731
            # a count the paper did not record leaves its total unknown (None: no ratio claimed)
            parts = ("sns_publishes", "sqs_polls") if r["channel"] == "queue" else ("s3_puts", "s3_gets", "s3_lists")
            counts = [num(k) for k in parts]
            requests = None if None in counts else sum(counts)
            mb = num("mb_sent" if r["channel"] == "queue" else "mb_written")
            rows[(r["channel"], int(r["neurons"]), int(r["workers"]))] = {
                "config": r["config"], "bytes": mb * 1e6 if mb is not None else None, "requests": requests,
                "usd": num("total_usd"), "lambda_mb": int(r["lambda_mb"]), "per_worker_s": num("per_worker_s"),
                "comm_s": num("comm_s"), "compute_s": num("compute_s"), "compress_s": num("compress_s"),
                "messages": num("messages")}
    return rows


def native_kernels(scratch: str) -> str:
    """Build the AOT native module (what the Lambda layer ships) for this Python into ``scratch``
    and return its path. A subprocess: importing ``fsd_kernels`` here would load the JIT first."""
    done = subprocess.run([sys.executable, "-m", "fsd_kernels._build", "--out", scratch],
                          capture_output=True, text=True, timeout=900, cwd=os.path.join(HERE, ".."))
    path = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    if not path or not os.path.isfile(path):
        raise SystemExit(f"bench/paper.py: building the native kernels failed (use --kernels jit):\n"
                         f"{done.stderr[-2000:]}")
    return path


AWS_CLIENTS_PROBE = """
import numpy, fsd_kernels.codec, fsd_runtime.worker
if {with_clients}:
    import boto3, fsd_runtime.aws.handler
    session = boto3.session.Session()
    clients = [session.client(name, region_name="us-east-1") for name in ("s3", "sqs", "sns")]
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def aws_clients_mb() -> float | None:
    """What a Lambda worker holds that a local one does not: the handler module, boto3 and its
    S3, SQS and SNS clients (peak RSS with them minus without, each in a fresh process with
    this run's kernels; kB -> MB). None without /proc."""
    peaks = []
    for with_clients in (False, True):
        done = subprocess.run([sys.executable, "-c", AWS_CLIENTS_PROBE.format(with_clients=with_clients)],
                              capture_output=True, text=True, timeout=300, cwd=os.path.join(HERE, ".."))
        if done.returncode != 0:
            return None
        peaks.append(int(done.stdout.split()[-1]))
    return max(0, peaks[1] - peaks[0]) / 1024


def dataset(n: int, layers: int, images: int):
    from fsd_runtime import model

    if n == 1024 and images <= 10000 and layers == 120:
        ds = model.embedded()
        if images < ds.images.shape[0]:
            ds = model.Dataset(ds.name, ds.network, ds.images.rows(0, images), None)
        return ds, f"official Graph Challenge 1024x120 net, first {images} official images (embedded)"
    return model.synthetic(n, layers, images, seed=0), f"synthetic challenge-like {n}x{layers}, {images} images (seed 0)"


#: The launch tree's fan-out (the runtime's default), also in the modelled launch skew.
FANOUT = 2


def run_one(model_dir: str, images, serial, n: int, p: int, channel: str, launcher: str, paper: dict,
            timeout: float | None, save_dir: str | None = None, parking: bool = True,
            clients_mb: float | None = None) -> dict:
    from fsd_runtime.aws import billing
    from fsd_runtime.coordinator import run_distributed

    local = {"kind": "local"}
    if channel == "queue":
        local["max_chunk_bytes"] = billing.queue_max_chunk_bytes(p)
    from fsd_runtime import budget

    # each worker within the paper's Lambda memory for this N, and all of them within this machine
    here = budget.default_worker_memory_mb(p, launcher)
    lambda_mb = paper.get("lambda_mb") or LAMBDA_MB.get(n, 2048)
    start = time.perf_counter()
    result = run_distributed(None, images, p, channel=local, launcher={"kind": launcher}, prepared=model_dir, fanout=FANOUT,
                             receive_timeout=timeout, run_timeout=None if timeout is None else timeout * 4,
                             worker_memory_mb=min(lambda_mb, here) if here else lambda_mb,
                             park_saturated=parking)
    wall_total = time.perf_counter() - start
    a = result.activations
    exact = bool(np.array_equal(a.indptr, serial.indptr) and np.array_equal(a.indices, serial.indices)
                 and np.array_equal(a.data.view(np.uint32), serial.data.view(np.uint32)))
    wm = result.worker_metrics
    per_worker = {}
    for r in result.metrics:
        acc = per_worker.setdefault(r["worker"], {"compute_s": 0.0, "codec_s": 0.0, "wait_s": 0.0})
        acc["compute_s"] += r["compute_s"]
        acc["codec_s"] += r["encode_s"] + r["decode_s"]
        acc["wait_s"] += r["wait_s"]
    split = {k: {"max": max(w[k] for w in per_worker.values()), "mean": float(np.mean([w[k] for w in per_worker.values()]))}
             for k in ("compute_s", "codec_s", "wait_s")}
    mpr = result.traffic["messages_per_round"]
    rss = [m.get("peak_rss_kb") for m in wm]
    growth = [m.get("peak_growth_kb") for m in wm]
    row = {
        "neurons": n, "workers": p, "channel": channel, "exact": exact, "images": images[0].shape[0] - 1,
        "local_bytes": result.traffic["bytes"],
        "messages": result.traffic["messages"], "chunks": result.traffic["chunks"],
        "messages_per_round": mpr, "rounds": sum(1 for m in mpr if m), "max_messages_per_round": max(mpr),
        "all_to_all_per_round": p * (p - 1),
        "wall_seconds": result.timings["run_s"], "startup_seconds": result.timings["startup_s"],
        "coordinator_seconds": wall_total, "plan_upload_s": result.timings["plan_upload_s"], "time_split": split,
        "worker_peak_rss_mb": max(rss) / 1024 if rss and all(r is not None for r in rss) else None,
        "worker_peak_rss_mb_mean": float(np.mean(rss)) / 1024 if rss and all(r is not None for r in rss) else None,
        "worker_peak_growth_mb": max(growth) / 1024 if growth and all(g is not None for g in growth) else None,
        "batches": max(int(m.get("batches") or 1) for m in wm),
        "launcher": launcher,
        "parking": parking,
        "aws_clients_mb": clients_mb,
        # what each worker downloads of the prepared model (its segments), for the share-download term
        "model_bytes_per_worker": result.traffic.get("model_bytes_per_worker"),
    }
    if save_dir:  # what pricing needs, so a changed cost model can re-price without re-running
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, f"{n}-{p}-{channel}{'' if parking else '-unparked'}.json"), "w") as f:
            json.dump({"row": row, "worker_metrics": [{k: m.get(k) for k in ("worker", "chunk_log", "fields", "layers")}
                                                      for m in wm],
                       "metrics": result.metrics}, f)
    return price(row, wm, result.metrics, paper)


def price(row: dict, worker_metrics: list[dict], metrics: list[dict], paper: dict) -> dict:
    """``row`` with the modelled channel's bytes, billed requests and $ (module notes), from the
    run's chunk log (``worker_metrics``) and per-layer metrics."""
    from fsd_runtime.aws import billing, cost

    channel, p, n = row["channel"], row["workers"], row["neurons"]
    paper_mb = paper.get("lambda_mb") or LAMBDA_MB.get(n, 2048)
    # Lambda memory: the smallest size that holds the measured worker peak plus the measured
    # footprint of the AWS clients a Lambda worker adds (``aws_clients_mb``) with a quarter to
    # spare, the paper's size when no peak was read; $ at the paper's size too, beside it. With
    # ``--kernels native`` the peak is of the worker path Lambda runs (numpy + the AOT module);
    # with ``jit`` it includes numba's ~140 MB, which Lambda never loads.
    peak_mb = row.get("worker_peak_rss_mb")
    if peak_mb:
        peak_mb += row.get("aws_clients_mb") or 0.0
    fit_note = None
    try:
        memory = cost.fitting_memory_mb(peak_mb) if peak_mb else paper_mb
    except ValueError as exc:  # a finished run is still reported: priced at the paper's size, said so
        memory, fit_note = paper_mb, f"{exc}; priced at the paper's {paper_mb} MB"
    def requests_at(memory_mb: int) -> dict:
        if channel == "queue":
            return billing.queue_requests(worker_metrics)
        # the conservative polls wait out the straggler time at this memory's CPU share
        return billing.object_requests(worker_metrics, p, memory_mb=memory_mb, n_batches=row.get("batches") or 1)

    req = requests_at(memory)
    share_bytes = dict(enumerate(row.get("model_bytes_per_worker") or ()))

    def seconds_at(mode: str, memory_mb: int) -> list[float]:
        # every term of cost.duration_terms: compute slowed to the memory's CPU share, the wait for
        # the layer's slowest worker, the hop of each layer with traffic (less what other batches'
        # compute covers, with several batches), INIT, the launch tree's
        # skew and the model download (result upload: its requests only; result bytes not kept)
        latency = cost.SEED_MEASURED if mode == "conservative" else cost.LATENCY
        return cost.duration_terms(metrics, channel, latency=latency, memory_mb=memory_mb, fanout=FANOUT,
                                   share_bytes=share_bytes, batches=row.get("batches") or 1)["per_worker"]

    def priced(mode: str, memory_mb: int, prices=cost.PRICES, counts=None) -> float:
        # conservative: the seed's measured mean exchange per layer (0.516 s) and the most
        # requests the replay allows; optimistic: the cost model's default hop, the fewest requests
        return cost.run_cost(billing.with_mode(counts or req, mode), seconds_at(mode, memory_mb),
                             n_images=row["images"], memory_mb=memory_mb, prices=prices)["usd"]

    seconds = seconds_at("conservative", memory)
    row = dict(row)
    row.update({
        "bytes": int(req["bytes_sent"]),
        "requests": billing.billed_total(channel, req), "requests_optimistic": billing.billed_total(channel, req, "optimistic"),
        "request_counts": req, "usd": priced("conservative", memory), "usd_optimistic": priced("optimistic", memory),
        # the paper's $ are priced on its own sheet (London, SNS bytes at $0.09/GB): ours on it too
        "usd_seed_prices": priced("conservative", memory, cost.SEED_PRICES),
        "usd_at_paper_memory": priced("conservative", paper_mb, counts=requests_at(paper_mb)),
        "lambda_mb_modelled": memory, "lambda_mb_paper": paper_mb, "modelled_worker_s_max": max(seconds),
        "duration_model": "cost.duration_terms (seed-measured hop)",
        "paper": {k: paper.get(k) for k in ("bytes", "requests", "usd", "lambda_mb", "messages", "per_worker_s",
                                              "comm_s", "compute_s", "compress_s")} if paper else None,
    })
    if fit_note:
        row["lambda_fit_note"] = fit_note
    if paper:
        row["ratios"] = {k: (row[k] / paper[k]) if paper.get(k) else None for k in ("bytes", "requests", "usd")}
        row["ratios"]["usd_seed_prices"] = row["usd_seed_prices"] / paper["usd"] if paper.get("usd") else None
    return row


def streamed_reference(stream, images, chunk: int = 60):
    """The serial ``fsd_kernels.infer`` result of a network too large to hold: ``chunk`` layers
    at a time, each chunk's output the next one's input (the same bits as one call: each layer
    depends only on the previous one's activations)."""
    import fsd_kernels
    from fsd_runtime import model

    x = images
    pending = []

    def flush(x):
        net = model.Network(stream.n_neurons, [w for w, _ in pending], [b for _, b in pending], ymax=stream.ymax)
        out = fsd_kernels.infer(*x, net.pack())
        pending.clear()
        return out

    out = None
    for w, b in stream.layers():
        pending.append((w, b))
        if len(pending) == chunk:
            out = flush(x)
            x = (out.indptr, out.indices, out.data)
    if pending:
        out = flush(x)
    return out


#: Issue 13 item 4, beyond the paper (no target): (neurons, layers, images, workers).
BEYOND = ((1024, 120, 60000, 8), (1024, 120, 60000, 62), (16384, 480, 10000, 42), (16384, 1920, 10000, 42))


def beyond(args, launcher: str) -> list[dict]:
    """Run what fits of :data:`BEYOND` on the queue channel; for what does not, say why."""
    from fsd_runtime import budget, model, prepared

    clients_mb = aws_clients_mb()
    rows = []
    for n, layers, n_images, p in BEYOND:
        if args.beyond_max_layers and layers > args.beyond_max_layers:
            rows.append({"neurons": n, "layers": layers, "images": n_images, "workers": p, "channel": "queue",
                         "ran": False, "why": f"more than --beyond-max-layers {args.beyond_max_layers}"})
            continue
        source = f"synthetic challenge-like {n}x{layers}, {n_images} images (seed 0)"
        images = model.generate_images(n_images, n, seed=1).arrays
        t0 = time.perf_counter()
        serial = streamed_reference(model.stream_synthetic(n, layers, 0), images)
        serial_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="fsd-paper-model-") as scratch:
            model_dir = os.path.join(scratch, "model")
            meta = prepared.prepare(f"synthetic:{n}x{layers}:0", model_dir, p)
            fps = prepared.footprints(prepared.open_model(model_dir), images[0], images[1])
            need_mb = max(budget.peak_bytes(fp, None) for fp in fps) / 2**20
            try:
                row = run_one(model_dir, images, serial, n, p, "queue", launcher, {}, args.receive_timeout,
                              clients_mb=clients_mb)
            except Exception as exc:  # reported: what did not run, and why
                row = {"neurons": n, "workers": p, "channel": "queue", "exact": False,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
        row.update({"layers": layers, "images": n_images, "ran": "error" not in row, "data": source,
                    "kernels": args.kernels,
                    "serial_seconds": serial_s, "prepare_s": meta["timings"]["total_s"], "model_bytes": meta["bytes"],
                    "worker_need_mb_one_batch": need_mb})
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("neurons", "layers", "images", "workers", "exact", "error",
                                                  "worker_peak_rss_mb", "lambda_mb_modelled",
                                                  "modelled_worker_s_max", "batches", "prepare_s")}),
              file=sys.stderr, flush=True)
    return rows


def show(row: dict) -> str:
    p = row["paper"] or {}
    r = row.get("ratios") or {}
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    return (f"{row['neurons']:>6} {row['workers']:>3} {row['channel']:<6} exact={row['exact']!s:<5} "
            f"bytes {row['bytes'] / 1e6:9.2f} MB (paper {f(p.get('bytes') and p['bytes'] / 1e6, '9.1f')}, x{f(r.get('bytes'), '.4f')}) "
            f"req {row['requests']:>7} (paper {f(p.get('requests'), '9.0f')}, x{f(r.get('requests'), '.4f')}) "
            f"$ {row['usd']:.5f} (paper {f(p.get('usd'), '.4f')}, x{f(r.get('usd'), '.4f')}) "
            f"msg/round max {row['max_messages_per_round']} of P(P-1)={row['all_to_all_per_round']} "
            f"rss {f(row['worker_peak_rss_mb'], '.0f')}/{p.get('lambda_mb', '-')} MB "
            f"start {row['startup_seconds']:.1f} s run {row['wall_seconds']:.2f} s")


def markdown(rows: list[dict]) -> str:
    """The README table: ours beside the paper's, with the ratios."""
    f = lambda x, spec="": "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["| N | P | channel | exact | bytes: ours / paper (ratio) | requests: ours / paper (ratio) | "
             "$: ours / paper (ratio) | $ on the seed's sheet (ratio) | $ at the paper's MB (ratio) | msgs/layer max (of P(P-1)) | rounds | "
             "worker peak RSS (own growth) / Lambda MB: fitted, paper | batches | start-up s | run s |",
             "|" + "---|" * 15]
    for r in sorted(rows, key=lambda r: (r["neurons"], r["workers"], r["channel"])):
        if "error" in r:
            lines.append(f"| {r['neurons']} | {r['workers']} | {r['channel']} | error: {r['error'][:80]} |" + " |" * 11)
            continue
        p, q = r["paper"] or {}, r.get("ratios") or {}
        at_paper = r.get("usd_at_paper_memory")
        lines.append(
            f"| {r['neurons']} | {r['workers']} | {r['channel']}{'' if r.get('parking', True) else ', unparked'} | "
            f"{'yes' if r['exact'] else 'NO'} | "
            f"{r['bytes'] / 1e6:.2f} MB / {f(p.get('bytes') and p['bytes'] / 1e6, '.0f')} MB ({f(q.get('bytes'), '.3f')}) | "
            f"{r['requests']:,} / {f(p.get('requests'), ',.0f')} ({f(q.get('requests'), '.3f')}) | "
            f"{r['usd']:.4f} / {f(p.get('usd'), '.4f')} ({f(q.get('usd'), '.3f')}) | "
            f"{f(r.get('usd_seed_prices'), '.4f')} ({f(q.get('usd_seed_prices'), '.3f')}) | "
            f"{f(at_paper, '.4f')} ({f(at_paper / p['usd'] if at_paper is not None and p.get('usd') else None, '.3f')}) | "
            f"{r['max_messages_per_round']} ({r['all_to_all_per_round']}"
            f"{' per batch, ' + str(r['batches']) + ' batches' if (r.get('batches') or 1) > 1 else ''}) | {r['rounds']} | "
            f"{f(r['worker_peak_rss_mb'], '.0f')} ({f(r.get('worker_peak_growth_mb'), '.0f')}) / "
            f"{f(r.get('lambda_mb_modelled'))}, {f(p.get('lambda_mb') or r.get('lambda_mb_paper'))} | "
            f"{f(r.get('batches'))} | {r['startup_seconds']:.1f} | {r['wall_seconds']:.2f} |")
    return "\n".join(lines)


def ours_usd(row: dict) -> float:
    """Our $ as the paper's are priced (its own sheet), where the row has it; else at list prices."""
    return row.get("usd_seed_prices") or row["usd"]


def plot(rows: list[dict], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    for channel in sorted({r["channel"] for r in rows}):
        fig, (top, bottom) = plt.subplots(1, 2, figsize=(11, 4.2))
        for n in sorted({r["neurons"] for r in rows if r["channel"] == channel}):
            of_n = sorted((r for r in rows if r["channel"] == channel and r["neurons"] == n), key=lambda r: r["workers"])
            mine = [r for r in of_n if r.get("parking", True)]
            unparked = [r for r in of_n if not r.get("parking", True)]
            line, = top.plot([r["workers"] for r in mine], [ours_usd(r) for r in mine], "o-", label=f"ours N={n}")
            color = line.get_color()
            bottom.plot([r["workers"] for r in mine], [r["bytes"] for r in mine], "o-", color=color, label=f"ours N={n}")
            if unparked:
                for ax, value in ((top, ours_usd), (bottom, lambda r: r["bytes"])):
                    ax.plot([r["workers"] for r in unparked], [value(r) for r in unparked], "x:", color=color,
                            label=f"ours, unparked N={n}")
            seen, theirs = set(), []
            for r in of_n:
                if r["paper"] and r["workers"] not in seen:
                    seen.add(r["workers"])
                    theirs.append((r["workers"], r["paper"]))
            for ax, key in ((top, "usd"), (bottom, "bytes")):
                points = [(w, q[key]) for w, q in theirs if q.get(key) is not None]
                if points:
                    ax.plot([w for w, _ in points], [v for _, v in points], "s--", color=color, alpha=0.6,
                            label=f"paper N={n}")
        for ax, what in ((top, "modelled $ a run, the seed's prices"),
                         (bottom, "bytes on the wire")):
            ax.set_yscale("log")
            ax.set_xlabel("workers")
            ax.set_ylabel(what)
            ax.legend(fontsize=7)
        fig.suptitle(f"{channel} channel: ours (solid; dotted: without parking) vs the paper (dashed)")
        fig.tight_layout()
        path = os.path.join(directory, f"paper-{channel}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,4096,16384,65536")
    ap.add_argument("--workers", default=",".join(map(str, PAPER_WORKERS)))
    ap.add_argument("--channels", default="queue,object")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--layers", type=int, default=120)
    ap.add_argument("--launcher", default="fork", choices=["fork", "process", "thread"])
    ap.add_argument("--receive-timeout", type=float, default=None,
                    help="seconds (default: the runtime's, derived from the work; the run timeout is 4x)")
    ap.add_argument("--no-parking", action="store_true",
                    help="compute and send saturated images every layer, as the paper's system does "
                         "(shows what the runtime's parking shortcut saves; same bits)")
    ap.add_argument("--kernels", default="native", choices=["native", "jit"],
                    help="native (default): build the AOT module Lambda runs and run every worker on it, "
                         "so peak RSS is of Lambda's worker path (no numba); jit: numba's JIT kernels")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rows-file", metavar="PATH", help="also append each row as a JSON line as soon as it is done")
    ap.add_argument("--plot", metavar="DIR")
    ap.add_argument("--from-rows", metavar="PATH", help="no runs: print the markdown table (and --plot) of a --rows-file")
    ap.add_argument("--save-runs", metavar="DIR", help="also keep each run's chunk log and metrics (for --reprice)")
    ap.add_argument("--reprice", metavar="DIR", help="no runs: price the runs kept by --save-runs again, as --json rows")
    ap.add_argument("--beyond", action="store_true",
                    help="instead of the matrix: 60,000 images at 1024 neurons, 480 and 1920 layers at 16384 "
                         "(queue channel; checked against a serial run streamed chunk by chunk)")
    ap.add_argument("--beyond-max-layers", type=int, default=None, help="with --beyond: skip deeper nets")
    args = ap.parse_args(argv)
    if args.reprice:
        table = paper_rows()
        rows = []
        for name in sorted(os.listdir(args.reprice)):
            if name.endswith(".json"):
                with open(os.path.join(args.reprice, name)) as f:
                    saved = json.load(f)
                r = saved["row"]
                rows.append(price(r, saved["worker_metrics"], saved["metrics"],
                                  table.get((r["channel"], r["neurons"], r["workers"])) or {}))
        print(json.dumps({"rows": rows, "repriced": args.reprice}))
        return 0
    if args.from_rows:
        with open(args.from_rows) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(markdown(rows))
        if args.plot:
            print("\n".join(plot([r for r in rows if "error" not in r], args.plot)))
        return 0
    saved = {name: os.environ.get(name) for name in ("FSD_KERNELS_NATIVE", "FSD_KERNELS_BACKEND")}
    try:
        with tempfile.TemporaryDirectory(prefix="fsd-paper-native-") as scratch:
            # the workers' kernels, by environment (every worker process inherits it); a native
            # module already named by FSD_KERNELS_NATIVE is used as it is
            if args.kernels == "native":
                os.environ.pop("FSD_KERNELS_BACKEND", None)
                if not os.environ.get("FSD_KERNELS_NATIVE"):
                    os.environ["FSD_KERNELS_NATIVE"] = native_kernels(scratch)
            else:
                os.environ.pop("FSD_KERNELS_NATIVE", None)
                os.environ["FSD_KERNELS_BACKEND"] = "jit"
            if args.beyond:
                rows = beyond(args, args.launcher)
                print(json.dumps({"beyond": rows, "kernels": args.kernels,
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
                return 0 if all(r.get("exact") for r in rows if r.get("ran")) else 1
            return run_matrix(args, ap)
    finally:  # called in-process (tests): leave the environment as it was
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_matrix(args, ap) -> int:
    import fsd_kernels
    from fsd_runtime import prepared

    clients_mb = aws_clients_mb()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    workers = [int(w) for w in args.workers.split(",") if w]
    channels = [c for c in args.channels.split(",") if c]
    bad = [c for c in channels if c not in ("queue", "object")]
    if bad:
        ap.error(f"unknown channel(s) {bad}; choose from queue, object")
    table = paper_rows()
    rows, notes = [], []
    for n in sizes:
        try:
            ds, source = dataset(n, args.layers, args.images)
        except MemoryError as exc:
            notes.append({"neurons": n, "error": f"MemoryError: {exc}"})
            continue
        images = ds.images.arrays
        t0 = time.perf_counter()
        serial = fsd_kernels.infer(*images, ds.network.pack())  # the reference; runs never see the net
        notes.append({"neurons": n, "data": source, "serial_seconds": time.perf_counter() - t0,
                      "categories": int(serial.categories.size)})
        for p in workers:
            # prepared once (partition and plans, streamed layer by layer), reused by both channels' runs
            with tempfile.TemporaryDirectory(prefix="fsd-paper-model-") as scratch:
                model_dir = os.path.join(scratch, "model")
                meta = prepared.prepare(ds.network, model_dir, p)
                for channel in channels:
                    paper = table.get((channel, n, p)) or {}
                    try:
                        row = run_one(model_dir, images, serial, n, p, channel, args.launcher, paper,
                                      args.receive_timeout, save_dir=args.save_runs,
                                      parking=not args.no_parking, clients_mb=clients_mb)
                        row["kernels"] = args.kernels
                        row["prepare_s"] = meta["timings"]["total_s"]
                        row["partition_s"] = meta["timings"]["partition_s"]
                        row["model_bytes"] = meta["bytes"]
                    except Exception as exc:  # reported, not hidden: a configuration that did not run
                        row = {"neurons": n, "workers": p, "channel": channel, "exact": False,
                               "parking": not args.no_parking, "error": f"{type(exc).__name__}: {exc}"[:500]}
                    row["data"] = source
                    rows.append(row)
                    if args.rows_file:
                        with open(args.rows_file, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    if not args.json:
                        print(show(row) if "error" not in row else f"{n} {p} {channel}: {row['error']}", flush=True)
                    else:
                        print(json.dumps({k: row.get(k) for k in ("neurons", "workers", "channel", "exact", "error")}),
                              file=sys.stderr, flush=True)
    out = {"rows": rows, "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "kernels": args.kernels, "aws_clients_mb": clients_mb,
           "machine": f"{os.cpu_count()} cores", "images": args.images, "layers": args.layers,
           "parking": not args.no_parking}
    if args.plot:
        try:
            out["plots"] = plot([r for r in rows if "error" not in r], args.plot)
        except ImportError as exc:
            out["plots"] = f"not drawn: {exc} (pip install '.[plot]')"
            print(out["plots"], file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0 if all(r.get("exact") for r in rows) else 1


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the runs' processes and the temporary directories go


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
