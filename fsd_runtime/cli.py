"""``fsd-inference``: run the Graph Challenge workload serially or distributed.

This module imports only the standard library (and fsd_runtime.aws's kind names, fsd_runtime.events's
caps) at load: ``--help`` and usage errors answer
without loading numpy, numba or boto3. Every option is checked (:func:`check_options`) before
any data is read or any work starts; options that do not apply to the run asked for are
refused, not ignored.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import signal
import struct
import sys
import threading
import time

from fsd_runtime.aws import ARCHITECTURES, AWS_CHANNELS, INVOKERS  # names only: no boto3
from fsd_runtime.events import MAX_BATCH_SIZE, MAX_FANOUT  # what a worker's event allows (stdlib only)

#: Exit statuses (also in ``--help`` and README).
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
EXIT_TEXT = """exit status:
  0    success (and the categories match the golden file, if there is one)
  1    the run completed but its categories differ from the golden file
  2    usage or data error (bad option, option that does not apply, bad or missing file,
       no deployment to run on)
  3    the run failed (a worker, the channel, the launch or the store), or its metrics
       could not be written (the result is printed all the same)
  130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): the run's processes,
       sockets and stored objects (prepare: the model's directory) are removed first"""

#: Most workers a run may have. Planning takes time and memory growing with P^2 (on this
#: project's 2-core machine: P=128 about 50 s and 1.3 GB, P=256 about 220 s and 4 GB).
MAX_WORKERS = 256

#: ``run`` options that apply to distributed runs only (dest names).
DISTRIBUTED_ONLY = ("channel", "partition", "fanout", "receive_timeout", "run_timeout", "metrics_dir",
                    "worker_memory_mb")
#: ``run`` options that apply to the AWS channels only.
AWS_ONLY = ("invoker", "deployment", "endpoint_url", "region", "profile", "memory_mb", "architecture")


class UsageError(ValueError):
    """An option (or combination) the CLI refuses; exit status 2."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds the run (its clean-up runs), then exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


# --- kernels: never compiled silently ---

def _kernel_cache_found() -> bool:
    """Whether the kernels load without compiling: the AOT native module, or numba's cache
    files of both kernel modules (next to the sources, or under $NUMBA_CACHE_DIR)."""
    spec = importlib.util.find_spec("fsd_kernels")
    if spec is None or not spec.submodule_search_locations:
        return False
    package = list(spec.submodule_search_locations)[0]
    forced = os.environ.get("FSD_KERNELS_BACKEND", "").strip().lower()
    if forced != "jit" and os.environ.get("FSD_KERNELS_NATIVE", "").strip():
        return True  # a native module named by path (_backend fails clearly if it is not there)
    if forced != "jit" and glob.glob(os.path.join(package, "_native*")):
        return True
    if os.environ.get("NUMBA_CACHE_DIR"):  # numba then caches there only
        places = [os.path.join(os.environ["NUMBA_CACHE_DIR"], "**")]
    else:  # next to the sources, else (read-only tree) numba's user-wide cache
        places = [os.path.join(package, "__pycache__"),
                  os.path.join(os.path.expanduser("~"), ".cache", "numba", "**")]
    return all(any(glob.glob(os.path.join(place, f"{module}.*.nbi"), recursive=True) for place in places)
               for module in ("_core", "_codec_core"))


def load_kernels(args=None):
    """Import ``fsd_kernels``; when numba has to compile them (the first run on a machine), say
    so before, once, and how long it took after."""
    if "fsd_kernels" in sys.modules:
        return sys.modules["fsd_kernels"]
    compiling = not _kernel_cache_found()
    if compiling:
        print("[fsd-inference] compiling the kernels for this machine (first run only: 1-3 minutes; "
              "numba caches them for later runs)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    import fsd_kernels

    took = time.perf_counter() - start
    if compiling or took > 5:
        print(f"[fsd-inference] kernels {'compiled' if compiling else 'loaded'} in {took:.1f} s "
              f"({fsd_kernels.backend})", file=sys.stderr, flush=True)
    return fsd_kernels


# --- options ---

def _int_at_least(low: int):
    """An option's integer parser: at least ``low``."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_seed = _int_at_least(0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 s, got {text}")
    return value


def _workers(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_WORKERS} workers (planning grows with P^2: P=256 takes minutes and GBs), got {value}")
    return value


def _capped(cap: int, why: str):
    """A positive integer at most ``cap``."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > cap:
            raise argparse.ArgumentTypeError(f"at most {cap} ({why}), got {value}")
        return value
    return parse


#: The largest float32 (values are stored as float32: a larger one would become inf).
FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]


def _finite(text: str) -> float:
    """A number float32 can hold (it is stored as one)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not abs(value) <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"expected a finite number float32 can hold (magnitude at most "
                                         f"{FLOAT32_MAX:.7g}), got {text!r}")
    return value


def _age(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected finite seconds >= 0, got {text!r}")
    return value


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the embedded official 1024x120 net, 10,000 images)")
    g.add_argument("--weights", help="network: a directory of n{N}-l{k}.tsv layer files (optional n{N}-bias.tsv, "
                                     "n{N}-ymax.tsv) or an .npz file (docs/formats.md); with --inputs")
    g.add_argument("--inputs", help="official input file (image neuron value), .tsv or .tsv.gz (with --weights)")
    g.add_argument("--categories", help="official categories file, for the golden check (with --weights)")
    g.add_argument("--bias", type=_finite,
                   help="bias for a --weights directory without a bias file (default: the Graph "
                        "Challenge one for N)")
    g.add_argument("--synthetic", metavar="NxL", help="a seeded challenge-like net, e.g. 4096x480")
    g.add_argument("--images", type=_positive_int,
                   help="use only the first K images (synthetic: make K; default 1000)")
    g.add_argument("--seed", type=_seed, default=0, help="seed for --synthetic")


def _add_aws_options(group) -> None:
    group.add_argument("--deployment", default="fsd-inference", help="deployment name (resource prefix)")
    group.add_argument("--endpoint-url", help="AWS API endpoint (e.g. a local server); else AWS_ENDPOINT_URL*")
    group.add_argument("--region", help="AWS region; else AWS_REGION / the profile's")
    group.add_argument("--profile", help="AWS profile; else AWS_PROFILE")


def add_aws_run_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("AWS (with --channel queue|object; settings also from env and profiles)")
    g.add_argument("--invoker", choices=INVOKERS, default=None,
                   help="how workers start: local (handler in local processes; default), lambda "
                        "(the deployed function), rie (aws-lambda-rie + awslambdaric on 127.0.0.1)")
    _add_aws_options(g)
    g.add_argument("--memory-mb", type=_positive_int, default=2048, help="Lambda memory for the cost model")
    g.add_argument("--architecture", choices=ARCHITECTURES, default="x86_64",
                   help="Lambda architecture for the cost model")


def add_commands(sub) -> None:
    """The ``deploy``, ``teardown``, ``cleanup`` and ``clean`` subcommands."""
    for name, text in (("deploy", "create or update the AWS resources of a deployment (idempotent)"),
                       ("teardown", "delete every AWS resource of a deployment (idempotent)"),
                       ("cleanup", "delete what killed runs of a deployment left behind (run queues, "
                                   "subscriptions, run objects), wherever their coordinator ran; the "
                                   "deployment stays")):
        p = sub.add_parser(name, help=text, description=text, epilog=EXIT_TEXT,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_aws_options(p)
        p.add_argument("--topics", type=_positive_int, default=4, help="SNS topics the queue channel spreads over")
        p.add_argument("--architecture", choices=ARCHITECTURES, default="x86_64")
        if name == "deploy":
            p.add_argument("--python", default="3.13", help="Lambda Python runtime version")
            p.add_argument("--memory-mb", type=_positive_int, default=2048)
            p.add_argument("--timeout", type=_positive_int, default=900, help="Lambda timeout in seconds")
            p.add_argument("--layer-zip", help="layer zip (default: dist/ from ./layer.zip.sh)")
            p.add_argument("--no-lambda", action="store_true",
                           help="bucket and topics only (enough for --invoker local|rie)")
            p.add_argument("--max-workers", type=_positive_int, default=64,
                           help="most workers one run may use (held to inside the function)")
            p.add_argument("--max-fanout", type=_positive_int, default=16, help="most tree children per worker")
            p.add_argument("--reserved-concurrency", type=int, default=100,
                           help="concurrent executions reserved for (and capping) the function; 0: none")
            p.add_argument("--coordinator-mode", action="store_true",
                           help="let the function also coordinate runs ({\"coordinate\": ...} events)")
            p.add_argument("--template-only", action="store_true",
                           help="print the SAM/CloudFormation template instead of calling AWS")
        else:
            p.add_argument("--python", default="3.13")
        if name == "cleanup":
            p.add_argument("--older-than", type=_age, default=0.0, metavar="SECONDS",
                           help="only what is at least this old (default 0: everything of past runs; "
                                "do not run it with 0 while a run of the deployment is going)")
    text = ("remove what runs on this machine whose coordinator died left behind: local stores, socket "
            "directories and run records in $TMPDIR, and their SQS queues, subscriptions and S3 objects "
            "(for a deployment's leftovers from elsewhere, see 'cleanup')")
    sub.add_parser("clean", help=text, description=text + ". Runs in progress are never touched; "
                   "every run also removes local leftovers when it starts.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsd-inference", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run inference and check the categories", allow_abbrev=False,
                         description="Run inference and check the categories against the golden file.",
                         epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(run)
    run.add_argument("--threads", type=_positive_int, default=None, help="kernel threads (default: all cores)")
    run.add_argument("--batch-size", type=_capped(MAX_BATCH_SIZE, "a worker's event allows no more"),
                     default=None, help=f"images per block, 1..{MAX_BATCH_SIZE} (default: by size)")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    dist = run.add_argument_group("distributed (with --workers)")
    dist.add_argument("--workers", type=_workers,
                      help=f"run on P workers, 1..{MAX_WORKERS} and at most the net's neurons "
                           "(default: serial, in this process)")
    dist.add_argument("--channel", default="local", choices=("local", *AWS_CHANNELS),
                      help="how workers talk: local (default), queue (SNS+SQS), object (S3)")
    dist.add_argument("--partition", default="hypergraph", choices=("contiguous", "hypergraph"),
                      help="how neurons are split over workers (default: hypergraph)")
    dist.add_argument("--fanout", type=_capped(MAX_FANOUT, "a worker's event allows no more"), default=2,
                      help=f"children per worker in the launch tree, 1..{MAX_FANOUT}")
    dist.add_argument("--receive-timeout", type=_seconds, default=None,
                      help="seconds a worker waits for a peer's message once every peer has started "
                           "(start-up is bounded by --run-timeout; a dead local worker is reported "
                           "within a second; default: from the work, at least 60, see docs/runtime.md)")
    dist.add_argument("--run-timeout", type=_seconds, default=None,
                      help="seconds the whole run may take (default: from the work, at least 900)")
    dist.add_argument("--worker-memory-mb", type=_megabytes, default=None,
                      help="each worker's memory budget: without --batch-size, images are batched to fit "
                           "it (default: the Lambda function's memory; locally, the memory available "
                           "shared by the workers)")
    dist.add_argument("--prepared", metavar="DIR",
                      help="run a model made by `fsd-inference prepare` (no partitioning or planning "
                           "here; --workers defaults to the model's; the data options still name the "
                           "network, which must be the model's, or give --inputs alone)")
    dist.add_argument("--metrics-dir", help="write per-worker, per-layer metrics (JSON, CSV; PNG with "
                                            "matplotlib) here; checked before the run")
    add_aws_run_options(run)
    add_prepare_command(sub)
    add_commands(sub)
    return parser


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected megabytes, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 10**7):
        raise argparse.ArgumentTypeError(f"expected megabytes in (0, 10000000], got {text!r}")
    return value


def add_prepare_command(sub) -> None:
    text = ("partition a network and plan every worker's share once, layer by layer (memory does not "
            "grow with the layers), into a directory that `run --prepared DIR` reuses")
    p = sub.add_parser("prepare", help=text, description=text + ".", allow_abbrev=False,
                       epilog=EXIT_TEXT, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("network (default: the embedded official 1024x120 net)")
    g.add_argument("--weights", help="a directory of n{N}-l{k}.tsv layer files (optional n{N}-bias.tsv, "
                                     "n{N}-ymax.tsv) or an .npz network file (docs/formats.md)")
    g.add_argument("--bias", type=_finite, help="bias for a --weights directory without a bias file")
    g.add_argument("--synthetic", metavar="NxL", help="a seeded challenge-like net, e.g. 16384x480")
    g.add_argument("--seed", type=_seed, default=None, help="seed for --synthetic (default 0)")
    p.add_argument("--out", required=True, help="a new (or empty) directory for the prepared model")
    p.add_argument("--workers", type=_workers, required=True, help=f"workers of the runs, 1..{MAX_WORKERS}")
    p.add_argument("--partition", default="hypergraph", choices=("contiguous", "hypergraph"),
                   help="how neurons are split over workers (default: hypergraph)")
    p.add_argument("--segment-mb", type=_positive_int, default=64,
                   help="buffered worker parts (all workers) written out as one segment each (default 64)")
    p.add_argument("--json", action="store_true", help="print the model's metadata as one JSON object")


def check_prepare_options(args) -> None:
    if args.synthetic:
        parse_synthetic(args.synthetic, images=False)
        for dest in ("weights", "bias"):
            if getattr(args, dest) is not None:
                raise UsageError(f"--{dest} does not apply to --synthetic (a synthetic net has its own data)")
    elif args.seed is not None:
        raise UsageError("--seed applies to --synthetic only")
    if args.bias is not None and not args.weights:
        raise UsageError("--bias applies to --weights only")
    if args.weights and not os.path.exists(args.weights):
        raise UsageError(f"--weights {args.weights}: no such file or directory")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out}: exists and is not an empty directory")


def prepare_command(args) -> int:
    """``prepare``: exit 0 with the model's metadata, 2 on bad data, 3 if writing failed."""
    try:
        check_prepare_options(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    load_kernels(args)
    from fsd_runtime import prepared

    if args.synthetic:
        n, layers = parse_synthetic(args.synthetic, images=False)
        source = f"synthetic:{n}x{layers}:{args.seed or 0}"
    else:
        source = args.weights or "embedded"
    try:
        meta = prepared.prepare(source, args.out, args.workers, partition=args.partition, bias=args.bias,
                                segment_bytes=args.segment_mb * 2**20,
                                progress=lambda message: _progress(args, message))
    except (ValueError, TypeError) as exc:  # DataError, PreparedError: the input's fault
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(f"cannot write the prepared model to {args.out}: {exc}")
        return EXIT_FAILED
    except MemoryError:
        _error("not enough memory to prepare this network (a smaller --segment-mb?)")
        return EXIT_USAGE
    if args.json:
        print(json.dumps({k: v for k, v in meta.items() if k != "keeps_saturated"}))
    else:
        t = meta["timings"]
        print(f"prepared       {meta['name']}: {meta['n_neurons']} neurons x {meta['n_layers']} layers "
              f"for {meta['n_workers']} workers ({meta['partition']})")
        print(f"written        {os.path.abspath(args.out)}: {meta['bytes']} bytes in "
              f"{len(meta['segments'])} segments a worker")
        print(f"time           {t['total_s']:.1f} s (read {t['read_s']:.1f}, partition {t['partition_s']:.1f}, "
              f"plan {t['plan_s']:.1f}, write {t['write_s']:.1f})")
        print(f"network hash   {meta['network_hash']}")
    return EXIT_OK


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dest names of the options ``argv`` sets explicitly (abbreviations are off for ``run``)."""
    strings = {}
    for action in _subparser(parser, "run")._actions:
        for option in action.option_strings:
            strings[option] = action.dest
    return {strings[token.split("=", 1)[0]] for token in argv if token.split("=", 1)[0] in strings}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def parse_synthetic(text: str, images: bool = True) -> tuple[int, int]:
    """``--synthetic NxL``; N must suit the generator, and its image grid where images are made
    (``prepare`` makes only the net, which a run may feed its own inputs)."""
    parts = text.lower().split("x")
    try:
        n, l = (int(x) for x in parts)
    except ValueError:
        raise UsageError(f"--synthetic expects NxL, e.g. 4096x480, got {text!r}") from None
    if n < 1 or l < 1:
        raise UsageError(f"--synthetic needs positive N and L, got {text!r}")
    from fsd_runtime.model import synthetic_size_problem  # numpy: only once a synthetic net is asked for

    problem = synthetic_size_problem(n, images)
    if problem:
        raise UsageError(f"--synthetic {text}: {problem}")
    return n, l


def synthetic_bytes(n_neurons: int, n_layers: int, n_images: int) -> int:
    """A floor of the memory a synthetic dataset takes to make: the images are drawn on a dense
    images x neurons grid, the net holds 32 nonzeros a neuron and layer, twice over while packed."""
    return n_images * n_neurons + n_neurons * n_layers * 32 * 8 * 2


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_options(args, given: set[str]) -> None:
    """Refuse every option that is malformed or does not apply to the run asked for, before any
    work; :class:`UsageError` says which and why."""
    def refuse(dest: str, why: str) -> None:
        raise UsageError(f"--{dest.replace('_', '-')} {why}")

    if args.synthetic:
        n, l = parse_synthetic(args.synthetic)
        # with --prepared only the images are made (the net is streamed, to check its hash)
        need = synthetic_bytes(n, 0 if args.prepared else l, args.images or 1000)
        memory = _physical_memory()
        if memory and need > 0.8 * memory:
            raise UsageError(f"--synthetic {args.synthetic} with {args.images or 1000} images needs about "
                             f"{need / 2**30:.0f} GiB, more than this machine's {memory / 2**30:.0f} GiB allows")
        for dest in ("weights", "inputs", "categories", "bias"):
            if dest in given:
                refuse(dest, "does not apply to --synthetic (a synthetic net has its own data)")
    elif "seed" in given:
        refuse("seed", "applies to --synthetic only")
    if args.prepared and args.prepared.startswith("s3:"):
        if args.channel not in AWS_CHANNELS:
            refuse("prepared", "s3:PREFIX names a model in a deployment's bucket: add --channel queue|object")
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*", args.prepared[3:]) or ".." in args.prepared:
            refuse("prepared", f"s3:PREFIX needs a plain key prefix, e.g. s3:models/0123abcd, got {args.prepared!r}")
    if args.prepared:
        if not args.prepared.startswith("s3:") and not os.path.isdir(args.prepared):
            refuse("prepared", f"{args.prepared}: no such directory (make one with `fsd-inference prepare`)")
        if args.weights and not args.inputs:
            raise UsageError("--weights needs --inputs (with --prepared, --inputs may come alone)")
        if "bias" in given and not args.weights:
            refuse("bias", "applies to --weights only")
    elif bool(args.weights) != bool(args.inputs):
        raise UsageError("--weights and --inputs go together")
    if not args.weights and not (args.prepared and args.inputs):
        for dest in ("categories", "bias"):
            if dest in given:
                refuse(dest, "applies to --weights/--inputs only (the embedded data has its own)"
                       if not args.synthetic else "does not apply to --synthetic")
    for dest in ("weights", "inputs", "categories"):
        path = getattr(args, dest)
        if path and not os.path.exists(path):
            refuse(dest, f"{path}: no such file or directory")
    if not args.workers and not args.prepared:
        for dest in DISTRIBUTED_ONLY + AWS_ONLY:
            if dest in given:
                refuse(dest, "applies to distributed runs only: add --workers P")
        return
    if args.channel not in AWS_CHANNELS:
        for dest in AWS_ONLY:
            if dest in given:
                refuse(dest, "applies to --channel queue|object only")
    from fsd_runtime.launch import LaunchError, tree_depth

    args.partition_given = "partition" in given
    if args.workers:  # with --prepared and no --workers: checked once the model's count is read
        try:
            tree_depth(args.workers, args.fanout)
        except LaunchError as exc:
            raise UsageError(f"--workers {args.workers} with --fanout {args.fanout}: {exc}") from None
    if args.metrics_dir:
        check_metrics_dir(args.metrics_dir)


def check_metrics_dir(directory: str) -> None:
    """Create ``directory`` if needed and prove it writable, before the run."""
    probe = os.path.join(directory, f".fsd-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--metrics-dir {directory}: cannot write there ({exc.strerror or exc})") from None


def parse_run(argv: list[str]):
    """Parse and check ``run`` options (argparse exits 2 on malformed ones; UsageError otherwise)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        check_options(args, _given(parser, list(argv)))
    return args


# --- data ---

def load_data(args):
    """The dataset the data options name: official files, a synthetic net, or the embedded default."""
    from fsd_runtime import model

    if args.synthetic:
        n, l = parse_synthetic(args.synthetic)
        ds = model.synthetic(n, l, args.images or 1000, seed=args.seed)
    elif args.weights:
        ds = model.load_dataset(args.weights, args.inputs, args.categories, args.bias)
    else:
        ds = model.embedded()
    have = ds.images.shape[0]
    if args.images and not args.synthetic:
        if args.images > have:
            raise UsageError(f"--images {args.images}: the data has only {have} images")
        if args.images < have:
            gold = None if ds.categories is None else ds.categories[ds.categories < args.images]
            ds = model.Dataset(ds.name, ds.network, ds.images.rows(0, args.images), gold)
    if args.workers and args.workers > ds.network.n_neurons:
        raise UsageError(f"--workers {args.workers}: the net has only {ds.network.n_neurons} neurons "
                         "a layer (each worker needs at least one)")
    return ds


def open_prepared(args):
    """The ``--prepared`` model, checked against the worker count and partition asked for;
    ``args.workers`` becomes the model's. UsageError if it is none or not the one asked for."""
    from fsd_runtime import prepared
    from fsd_runtime.launch import LaunchError, tree_depth

    try:
        if args.prepared.startswith("s3:"):  # a model a run uploaded to the deployment's bucket
            from fsd_runtime.aws.run import prepared_store, run_options

            found = prepared.open_model(prepared_store(run_options(args)), args.prepared[3:])
        else:
            found = prepared.open_model(args.prepared)
        prepared.check_model(found, n_workers=args.workers,
                             partition=args.partition if getattr(args, "partition_given", False) else None)
    except prepared.PreparedError as exc:
        raise UsageError(f"--prepared {exc}") from None
    args.workers, args.partition = found.n_workers, found.partition
    try:
        tree_depth(args.workers, args.fanout)
    except LaunchError as exc:
        raise UsageError(f"--prepared model's {args.workers} workers with --fanout {args.fanout}: {exc}") from None
    return found


def load_prepared_data(args, found):
    """The images (and golden categories) the data options name, for a prepared model; the network
    they name is streamed through once to check it is the model's (never held whole)."""
    from types import SimpleNamespace

    from fsd_runtime import model, prepared

    n = found.n_neurons
    gold = None
    if args.synthetic:
        sn, sl = parse_synthetic(args.synthetic)
        source, name = f"synthetic:{sn}x{sl}:{args.seed}", f"synthetic-{sn}x{sl}"
        if sn != n:
            raise UsageError(f"--prepared {found.where()} is a network of {n} neurons, --synthetic has {sn}")
        images = model.generate_images(args.images or 1000, n, seed=args.seed + 1)
    elif args.inputs:
        source = args.weights
        name = os.path.basename(os.path.normpath(args.weights or found.meta.get("name") or args.prepared))
        images = model.read_images(args.inputs, n)
        if args.categories:
            gold = model.read_categories(args.categories)
            gold = gold[gold < images.shape[0]]
    else:
        ds = model.embedded()
        source, name, images, gold = ds.network, ds.name, ds.images, ds.categories
    if args.images and not args.synthetic:
        if args.images > images.shape[0]:
            raise UsageError(f"--images {args.images}: the data has only {images.shape[0]} images")
        images = images.rows(0, args.images)
        gold = None if gold is None else gold[gold < args.images]
    if source is not None:
        load_kernels(args)
        _progress(args, "checking that the network is the prepared model's (read one layer at a time)")
        try:
            prepared.check_model(found, network_hash=prepared.network_hash(source, args.bias))
        except prepared.PreparedError as exc:
            raise UsageError(f"--prepared {exc}") from None
    net = SimpleNamespace(n_layers=found.n_layers, n_neurons=n, nnz=found.meta["nnz"])
    return model.Dataset(name, net, images, gold)


def summary(ds, categories, seconds: float) -> dict:
    """The keys every run reports (categories are 1-based image ids)."""
    import numpy as np

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


def run_serial(args, ds) -> dict:
    fsd_kernels = load_kernels(args)
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
    """The launcher config the run options name: local processes, forked where the OS can
    (worker 0 loads numpy and the kernels once and every other worker is forked from its tree
    parent: start-up does not grow with P), else each started afresh."""
    return {"kind": "fork" if hasattr(os, "fork") else "process"}


class RunFailed(Exception):
    """The distributed run failed (worker, channel, launch, store, deployment): exit 3."""


def run_distributed(args, ds) -> dict:
    """``run --workers P``: the distributed runtime; wall_seconds excludes worker start-up."""
    from contextlib import nullcontext

    load_kernels(args)
    from fsd_runtime.coordinator import run_distributed as run

    aws_run = None
    if args.channel != "local" or args.invoker:
        from fsd_runtime.aws.run import AwsRun, run_options

        aws_run = AwsRun(run_options(args), args.workers)

    with aws_run or nullcontext():  # checks the deployment first: a missing one is exit 2
        if args.prepared:
            net = None
        else:
            _progress(args, f"packing {ds.network.n_layers} layers of {ds.network.n_neurons} neurons")
            net = ds.network.pack()
        from fsd_runtime.budget import MemoryBudgetError
        from fsd_runtime.coordinator import RunError
        from fsd_runtime.prepared import PreparedError

        try:
            result = run(net, ds.images.arrays, args.workers, partition=args.partition,
                         prepared=getattr(args, "prepared_model", None),
                         channel=aws_run.channel_config() if aws_run else channel_config(args),
                         launcher=aws_run.launcher_config() if aws_run else launcher_config(args),
                         storage=aws_run.storage if aws_run else None, fanout=args.fanout,
                         batch_size=args.batch_size, receive_timeout=args.receive_timeout,
                         run_timeout=args.run_timeout, metrics_dir=args.metrics_dir,
                         progress=lambda message: _progress(args, message),
                         worker_memory_mb=args.worker_memory_mb or (aws_run.memory_mb if aws_run else None))
        except MemoryBudgetError as exc:  # before launch: the options' to fix
            raise UsageError(f"--worker-memory-mb: {exc}") from None
        except PreparedError as exc:  # a file of the model is bad (layer0.npz; a segment, found by its worker)
            raise UsageError(str(exc) if isinstance(exc, RunError) else f"--prepared {exc}") from None
    out = summary(ds, result.categories, result.timings["run_s"])
    out.update(mode="distributed", workers=args.workers, channel=args.channel, partition=args.partition,
               traffic=result.traffic, metrics_path=result.metrics_paths.get("json"),
               startup_seconds=result.timings["startup_s"], timings=result.timings)
    if result.model:
        out["prepared_model"] = result.model
    if args.metrics_dir:
        out["metrics_error"] = result.metrics_error
        out["metrics_png"] = result.metrics_paths.get("png")
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
    if out.get("metrics_path"):
        png = "and PNG" if out.get("metrics_png") else \
            "(no PNG: matplotlib is not installed; pip install 'fsd-inference[plot]')"
        print(f"metrics        {os.path.dirname(out['metrics_path'])}: JSON, CSV {png}")


# --- signals ---

class _Signals:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, once: a second signal
    while the run cleans up is ignored, so the clean-up finishes."""

    def __init__(self):
        self.saved = {}
        self.fired = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.saved[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.fired is None:
            self.fired = signum
            raise Interrupted(signum)

    def __exit__(self, *exc):
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)


def _error(message: str) -> None:
    print(f"fsd-inference: error: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    state: dict = {}
    with _Signals() as signals:
        try:
            return _main(argv, state)
        except (Interrupted, KeyboardInterrupt) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            name = signal.Signals(signum).name
            done = {"run": "; the run's workers, sockets and stored objects are removed",
                    "prepare": "; the model being prepared is removed"}.get(state.get("interrupts", ""), "")
            print(f"fsd-inference: {'interrupted' if signum == signal.SIGINT else 'terminated'} ({name}){done}",
                  file=sys.stderr, flush=True)
            return 128 + signum
        finally:
            signals.fired = signals.fired or -1  # no Interrupted raised after main's end


def _main(argv: list[str], state: dict) -> int:
    try:
        args = parse_run(argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    # what an interrupt's message says was cleaned up: a distributed run's, or a model's
    state["interrupts"] = ("prepare" if args.command == "prepare" else
                           "run" if getattr(args, "workers", None) or getattr(args, "prepared", None) else "")
    if args.command == "clean":
        from fsd_runtime import liveness

        lines = liveness.sweep(aws=True)
        print("\n".join(lines) if lines else "nothing to clean")
        return EXIT_OK if not any(line.startswith("could not") for line in lines) else EXIT_FAILED
    if args.command == "prepare":
        return prepare_command(args)
    if args.command in ("deploy", "teardown", "cleanup"):
        from fsd_runtime.aws import run as awsrun

        return awsrun.cli_command(args)
    try:
        for option in ("inputs", "categories"):  # files; a directory would fail as "[Errno 21]"
            path = getattr(args, option, None)
            if path and os.path.isdir(path):
                raise UsageError(f"--{option} {path} is a directory; it takes a file (docs/formats.md)")
        if args.prepared:
            args.prepared_model = open_prepared(args)
            ds = load_prepared_data(args, args.prepared_model)
        else:
            ds = load_data(args)
    except (UsageError, ValueError, OSError) as exc:  # model.DataError is a ValueError
        _error(str(exc))
        return EXIT_USAGE
    except MemoryError:
        _error("not enough memory to hold the data these options ask for (fewer --images, a smaller "
               "--synthetic net?)")
        return EXIT_USAGE
    try:
        out = run_distributed(args, ds) if args.workers else run_serial(args, ds)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 (every failure of a run: one message, exit 3)
        if type(exc).__name__ == "DeployError":  # nothing deployed to run on: the user's to fix
            _error(str(exc))
            return EXIT_USAGE
        from fsd_runtime.coordinator import RunError
        from fsd_runtime.worker import WorkerError

        known = isinstance(exc, (RunError, WorkerError, OSError, ValueError)) or \
            type(exc).__module__.startswith(("fsd_runtime", "botocore"))
        _error(str(exc) if known else f"unexpected {type(exc).__name__}: {exc}")
        if os.environ.get("FSD_DEBUG"):
            raise
        return EXIT_FAILED
    if args.json:
        print(json.dumps(out))
    else:
        print_human(out)
    sys.stdout.flush()
    if out.get("metrics_error"):
        _error(out["metrics_error"] + " (the result above stands)")
        return EXIT_FAILED
    return EXIT_OK if out["golden_match"] is not False else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
