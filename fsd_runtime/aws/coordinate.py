"""The handler's coordinator mode: a whole ``fsd-inference run --invoker lambda`` inside the function.

Kept apart from :mod:`fsd_runtime.aws.run` so that the AWS side never imports the CLI: the
handler imports this module, this module the CLI, the CLI the AWS side.
"""
from __future__ import annotations

from typing import Mapping

from fsd_runtime import cli


#: ``run`` options a ``{"coordinate": {...}}`` event may set (no file paths: the data is the
#: embedded default or a synthetic net; AWS settings come from the function's environment).
COORDINATE_OPTIONS = frozenset({
    "workers", "channel", "invoker", "deployment", "images", "synthetic", "seed", "partition",
    "fanout", "batch_size", "receive_timeout", "run_timeout", "memory_mb", "architecture", "worker_memory_mb",
    "prepared"})


def coordinate(options: Mapping, limits: Mapping | None = None) -> dict:
    """The handler's coordinator mode: ``fsd-inference run`` with ``options`` (its long options
    without dashes, e.g. ``{"workers": 8, "channel": "queue"}``; invoker ``lambda`` unless
    given), answering the run's JSON. ``limits``: the deployment's (``handler.deployment_limits``)
    when inside the deployed function."""
    if not isinstance(options, Mapping):
        raise ValueError(f"'coordinate' must be an object of run options, got {options!r}")
    unknown = sorted(set(options) - COORDINATE_OPTIONS)
    if unknown:
        raise ValueError(f"'coordinate' has options a coordinator event may not set: {unknown}; "
                         f"allowed: {sorted(COORDINATE_OPTIONS)}")
    if not (options.get("workers") or options.get("prepared")) or options.get("channel") not in cli.AWS_CHANNELS:
        raise ValueError("'coordinate' needs 'workers' (or 'prepared') and 'channel' (queue or object)")
    prepared = options.get("prepared")
    if prepared is not None and not str(prepared).startswith("s3:"):
        raise ValueError("'coordinate' option 'prepared' must be s3:PREFIX, a model in the deployment's bucket")
    argv = ["run", "--invoker", "lambda"]
    for key, value in options.items():
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ValueError(f"'coordinate' option {key!r} must be a number or a string, got {value!r}")
        argv += [f"--{key.replace('_', '-')}", str(value)]
    try:
        args = cli.parse_run(argv)
    except SystemExit:
        raise ValueError(f"'coordinate' options are not valid run options: {dict(options)}") from None
    except cli.UsageError as exc:
        raise ValueError(f"'coordinate' options are not valid: {exc}") from None
    # inside the deployed function: its own deployment only, refused before any read of its bucket
    if limits is not None and (args.invoker != "lambda" or args.deployment != limits["deployment"]):
        raise ValueError(f"'coordinate' inside deployment {limits['deployment']!r} runs only "
                         f"--invoker lambda on that deployment")
    if args.prepared:  # its worker count and partition, from the model's metadata
        try:
            args.prepared_model = cli.open_prepared(args)
        except cli.UsageError as exc:
            raise ValueError(f"'coordinate' options are not valid: {exc}") from None
    if limits is not None:  # within the deployment's limits (a prepared model's worker count too)
        if args.workers > limits["max_workers"] or args.fanout > limits["max_fanout"]:
            raise ValueError(f"'coordinate' asks {args.workers} workers / fan-out {args.fanout}; the "
                             f"deployment allows {limits['max_workers']} / {limits['max_fanout']}")
    if args.prepared:  # the coordinator reads the model's metadata and the images, never the net whole
        return cli.run_distributed(args, cli.load_prepared_data(args, args.prepared_model))
    return cli.run_distributed(args, cli.load_data(args))
