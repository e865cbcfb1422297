"""``fsd-inference``: run the Graph Challenge workload serially or distributed."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fsd_runtime import model


def _progress(args, message: str) -> None:
    if not args.json or sys.stderr.isatty():
        print(f"[fsd-inference] {message}", file=sys.stderr, flush=True)


def _batch_progress():
    """A ``progress(done, total)`` callback redrawing one stderr line, on a terminal only."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r[fsd-inference] {done}/{total} images ({100 * done // max(total, 1)}%)",
              end=end, file=sys.stderr, flush=True)

    return show


def load_data(args) -> model.Dataset:
    """The dataset the data options name: official files, a synthetic net, or the embedded default."""
    if args.synthetic:
        try:
            n, l = (int(x) for x in args.synthetic.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--synthetic expects NxL, e.g. 4096x480, got {args.synthetic!r}")
        ds = model.synthetic(n, l, args.images or 1000, seed=args.seed)
    elif args.weights or args.inputs:
        if not (args.weights and args.inputs):
            raise SystemExit("--weights and --inputs go together")
        ds = model.load_dataset(args.weights, args.inputs, args.categories, args.bias)
    else:
        ds = model.embedded()
    if args.images and not args.synthetic and args.images < ds.images.shape[0]:
        gold = None if ds.categories is None else ds.categories[ds.categories < args.images]
        ds = model.Dataset(ds.name, ds.network, ds.images.rows(0, args.images), gold)
    return ds


def summary(ds: model.Dataset, categories: np.ndarray, seconds: float) -> dict:
    """The keys every run reports (categories are 1-based image ids)."""
    n_images = ds.images.shape[0]
    golden = None if ds.categories is None else bool(np.array_equal(categories, ds.categories))
    return {
        "dataset": ds.name,
        "images": n_images,
        "layers": ds.network.n_layers,
        "neurons": ds.network.n_neurons,
        "categories": [int(c) + 1 for c in categories],
        "golden_match": golden,
        "wall_seconds": seconds,
        "edges_per_second": n_images * ds.network.nnz / seconds if seconds > 0 else None,
    }


def run_serial(args, ds: model.Dataset) -> dict:
    import fsd_kernels

    _progress(args, f"packing {ds.network.n_layers} layers of {ds.network.n_neurons} neurons")
    net = ds.network.pack()
    _progress(args, f"inferring {ds.images.shape[0]} images ({fsd_kernels.backend} kernels)")
    start = time.perf_counter()
    result = fsd_kernels.infer(*ds.images.arrays, net, batch_size=args.batch_size,
                               threads=args.threads, progress=_batch_progress())
    seconds = time.perf_counter() - start
    out = summary(ds, result.categories, seconds)
    out.update(mode="serial", backend=fsd_kernels.backend)
    return out


def channel_config(args) -> dict:
    """The channel config the run options name (AWS kinds add their settings here)."""
    return {"kind": args.channel}


def launcher_config(args) -> dict:
    """The launcher config the run options name (local processes by default)."""
    return {"kind": "process"}


def run_distributed(args, ds: model.Dataset) -> dict:
    """``run --workers P``: the distributed runtime; wall_seconds excludes worker start-up."""
    from contextlib import nullcontext

    from fsd_runtime.coordinator import run_distributed as run

    aws_run = None
    if args.channel != "local" or args.invoker:
        from fsd_runtime.aws.run import AwsRun, run_options

        aws_run = AwsRun(run_options(args), args.workers)

    _progress(args, f"packing {ds.network.n_layers} layers of {ds.network.n_neurons} neurons")
    net = ds.network.pack()
    _progress(args, f"partitioning over {args.workers} workers ({args.partition}), "
                    f"launching them ({args.channel} channel)")
    with aws_run or nullcontext():
        result = run(net, ds.images.arrays, args.workers, partition=args.partition,
                     channel=aws_run.channel_config() if aws_run else channel_config(args),
                     launcher=aws_run.launcher_config() if aws_run else launcher_config(args),
                     storage=aws_run.storage if aws_run else None, fanout=args.fanout,
                     batch_size=args.batch_size, receive_timeout=args.receive_timeout,
                     run_timeout=args.run_timeout, metrics_dir=args.metrics_dir)
    out = summary(ds, result.categories, result.timings["run_s"])
    out.update(mode="distributed", workers=args.workers, channel=args.channel, partition=args.partition,
               traffic=result.traffic, metrics_path=result.metrics_paths.get("json"),
               startup_seconds=result.timings["startup_s"], timings=result.timings)
    if aws_run:
        out.update(invoker=aws_run.invoker,
                   cost=aws_run.cost(result.traffic, result.metrics, ds.images.shape[0]))
    return out


def print_human(out: dict) -> None:
    golden = {True: "yes", False: "NO", None: "no golden file"}[out["golden_match"]]
    print(f"dataset        {out['dataset']}: {out['neurons']} neurons x {out['layers']} layers, "
          f"{out['images']} images")
    print(f"categories     {len(out['categories'])} found; golden match: {golden}")
    print(f"wall time      {out['wall_seconds']:.3f} s")
    if out["edges_per_second"]:
        print(f"nominal rate   {out['edges_per_second'] / 1e9:.1f} billion edges/s")
    for key in ("workers", "channel", "partition"):
        if key in out:
            print(f"{key:<15}{out[key]}")
    if "startup_seconds" in out:
        print(f"start-up       {out['startup_seconds']:.3f} s (workers launched until all ready; "
              f"not in the wall time)")
    if "traffic" in out:
        t = out["traffic"]
        print(f"traffic        {t['bytes']} bytes in {t['messages']} messages, {t['requests']} requests")
    if "cost" in out:
        print(f"modelled cost  ${out['cost']['usd']:.6f}")


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the embedded official 1024x120 net, 10,000 images)")
    g.add_argument("--weights", help="network: a directory of n{N}-l{k}.tsv layer files (optional "
                                     "n{N}-bias.tsv, n{N}-ymax.tsv) or an .npz file (docs/formats.md)")
    g.add_argument("--inputs", help="official input file (image neuron value), .tsv or .tsv.gz")
    g.add_argument("--categories", help="official categories file, for the golden check")
    g.add_argument("--bias", type=float, help="bias for a --weights directory without a bias file "
                                             "(default: the Graph Challenge one for N)")
    g.add_argument("--synthetic", metavar="NxL", help="a seeded challenge-like net, e.g. 4096x480")
    g.add_argument("--images", type=int, help="use only the first K images (synthetic: make K)")
    g.add_argument("--seed", type=int, default=0, help="seed for --synthetic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsd-inference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run inference and check the categories")
    add_data_options(run)
    run.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    run.add_argument("--batch-size", type=int, default=None, help="images per block (default: by size)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    dist = run.add_argument_group("distributed (with --workers)")
    dist.add_argument("--workers", type=int, help="run on P workers (default: serial, in this process)")
    dist.add_argument("--channel", default="local", choices=("local", "queue", "object"),
                      help="how workers talk: local (default), queue (SNS+SQS), object (S3)")
    dist.add_argument("--partition", default="hypergraph", choices=("contiguous", "hypergraph"),
                      help="how neurons are split over workers (default: hypergraph)")
    dist.add_argument("--fanout", type=int, default=2, help="children per worker in the launch tree")
    dist.add_argument("--receive-timeout", type=float, default=60.0,
                      help="seconds a worker waits for a peer's message before the run fails")
    dist.add_argument("--run-timeout", type=float, default=900.0, help="seconds the whole run may take")
    dist.add_argument("--metrics-dir", help="write per-worker, per-layer metrics (JSON, CSV, PNG) here")
    from fsd_runtime.aws import run as awsrun

    awsrun.add_run_options(run)
    awsrun.add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("deploy", "teardown", "cleanup"):
        from fsd_runtime.aws import run as awsrun

        return awsrun.cli_command(args)
    from fsd_runtime.channels import ChannelError
    from fsd_runtime.coordinator import RunError
    from fsd_runtime.worker import WorkerError

    try:
        ds = load_data(args)
        out = run_distributed(args, ds) if args.workers else run_serial(args, ds)
    except (ValueError, OSError, ChannelError, RunError, WorkerError) as exc:
        print(f"fsd-inference: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        print_human(out)
    return 0 if out["golden_match"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
