"""The AWS side of the CLI: ``run --channel queue|object --invoker ...``, ``deploy``, ``teardown``.

:class:`AwsRun` turns the options into what the coordinator takes: the
deployment's S3 bucket as the run store, the channel config (the
deployment's topics or bucket), the launcher config (Lambda, local handler
processes, or a pool of aws-lambda-rie processes it starts and stops), and
afterwards the run's modelled cost. AWS settings come from the options,
else boto3's usual chain (env, profiles, ``AWS_ENDPOINT_URL*``). Workers on
Lambda get only the region: the coordinator's profile and endpoint mean
nothing inside Lambda.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import replace
from typing import Mapping

from botocore.exceptions import BotoCoreError, ClientError

import fsd_runtime
from fsd_runtime import aws, cost, deploy, invokers, template
from fsd_runtime.channels.queue import topic_name
from fsd_runtime.cli import AWS_CHANNELS, INVOKERS  # noqa: F401 (the parser's: it needs no boto3)
from fsd_runtime.s3storage import S3Storage

#: What a worker's own store calls are (fsd_runtime.worker.run_from_event): GET its share,
#: PUT its metrics and its result. The coordinator's calls are counted as they happen.
WORKER_STORE_CALLS = {"s3_get_requests": 1, "s3_put_requests": 2}


def aws_settings(args) -> aws.AwsSettings:
    return aws.AwsSettings(region=args.region, profile=args.profile, endpoint_url=args.endpoint_url)


def deploy_settings(args) -> deploy.DeploySettings:
    return deploy.DeploySettings(
        name=args.deployment, architecture=args.architecture, python=args.python,
        memory_mb=getattr(args, "memory_mb", 2048), timeout_s=getattr(args, "timeout", 900),
        topics=args.topics, lambda_function=not getattr(args, "no_lambda", False),
        coordinator_mode=getattr(args, "coordinator_mode", False),
        layer_zip=getattr(args, "layer_zip", None))


def run_command(args) -> int:
    """``deploy`` / ``teardown``: print what changed, one line each (or the template)."""
    settings = deploy_settings(args)
    if getattr(args, "template_only", False):
        print(template.render(settings))
        return 0
    if args.command == "deploy":
        lines = deploy.deploy(settings, aws_settings(args)) or ["up to date: nothing changed"]
    else:
        lines = [f"deleted {r}" for r in deploy.teardown(settings, aws_settings(args))] or ["nothing to delete"]
    print("\n".join(lines))
    return 0


def cli_command(args) -> int:
    """``deploy`` / ``teardown`` from the CLI: exit 2 with one clear line on any failure."""
    try:
        return run_command(args)
    except (ValueError, ClientError, BotoCoreError) as exc:
        print(f"fsd-inference: error: {exc}", file=sys.stderr)
        return 2


class AwsRun:
    """One run's AWS wiring; a context manager (an RIE pool lives as long as the run)."""

    def __init__(self, args, n_workers: int):
        if args.channel not in AWS_CHANNELS:
            raise ValueError(f"--invoker needs --channel queue or object, not {args.channel}")
        self.channel_kind = args.channel
        self.invoker = args.invoker or "local"
        self.n_workers = n_workers
        self.memory_mb = args.memory_mb
        self.architecture = args.architecture
        self.settings = aws_settings(args)
        try:
            self.names = deploy.names_for(deploy.DeploySettings(name=args.deployment), self.settings)
        except (ClientError, BotoCoreError) as exc:
            raise deploy.DeployError(f"cannot reach AWS to find deployment {args.deployment!r}: {exc}") from None
        on_lambda = self.invoker == "lambda"
        self.worker_settings = aws.AwsSettings(region=self.names.region) if on_lambda else self.settings
        self.pool: invokers.RiePool | None = None
        self.storage = S3Storage(self.names.bucket, self.settings, worker_settings=self.worker_settings)

    def __enter__(self) -> "AwsRun":
        self._check_deployed()
        if self.invoker == "rie":
            source_root = os.path.dirname(os.path.dirname(os.path.abspath(fsd_runtime.__file__)))
            path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH")) if p)
            self.pool = invokers.RiePool(self.n_workers, env={"PYTHONPATH": path}).start()
        invokers.register()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()

    def _check_deployed(self) -> None:
        s3 = aws.client("s3", self.settings)
        try:
            s3.head_bucket(Bucket=self.names.bucket)
        except ClientError as exc:
            raise deploy.DeployError(
                f"deployment {self.names.settings.name!r} has no bucket {self.names.bucket}: run "
                f"`fsd-inference deploy{' --no-lambda' if self.invoker != 'lambda' else ''}` first "
                f"({aws.error_code(exc) or exc})") from None
        if self.invoker == "lambda":
            lam = aws.client("lambda", self.settings)
            try:
                lam.get_function(FunctionName=self.names.function)
            except ClientError as exc:
                raise deploy.DeployError(f"deployment {self.names.settings.name!r} has no function: run "
                                         f"`fsd-inference deploy` first ({aws.error_code(exc)})") from None

    def deployed_topics(self) -> list[str]:
        """The deployment's topic ARNs, ``NAME-t0``, ``NAME-t1``, ... as deployed (runs create none)."""
        sns = aws.client("sns", self.settings)
        arns = {t["TopicArn"].rsplit(":", 1)[1]: t["TopicArn"]
                for page in sns.get_paginator("list_topics").paginate() for t in page["Topics"]}
        found = []
        while topic_name(self.names.settings.name, len(found)) in arns:
            found.append(arns[topic_name(self.names.settings.name, len(found))])
        if not found:
            raise deploy.DeployError(f"deployment {self.names.settings.name!r} has no topics: run "
                                     "`fsd-inference deploy` first")
        return found

    def channel_config(self) -> dict:
        if self.channel_kind == "queue":
            topics = self.deployed_topics()
            config = deploy.queue_config(self.names, self.worker_settings)
            return replace(config, topics=len(topics), topic_arns=tuple(topics)).to_dict()
        return {"kind": "object", "bucket": self.names.bucket, "aws": self.worker_settings.to_dict(),
                "create_bucket": False}

    def launcher_config(self) -> dict:
        if self.invoker == "lambda":
            return {"kind": "lambda", "function": self.names.function, "aws": self.worker_settings.to_dict()}
        if self.invoker == "rie":
            return self.pool.launcher_config()
        return {"kind": "local"}

    def cost(self, traffic: Mapping, metrics: list[dict], n_images: int) -> dict:
        """Modelled cost of the run: the channel's counted requests, the store's (coordinator
        counted, workers' by :data:`WORKER_STORE_CALLS`), modelled Lambda durations."""
        requests: Counter = Counter(traffic.get("channel_requests", {}))
        requests.update(cost.s3_counters(self.storage.call.attempts))
        requests.update({k: v * self.n_workers for k, v in WORKER_STORE_CALLS.items()})
        seconds = cost.modelled_worker_seconds(metrics, self.channel_kind)
        out = cost.run_cost(requests, seconds, n_images=n_images, memory_mb=self.memory_mb,
                            architecture=self.architecture)
        out["duration"] = "modelled"
        return out



#: ``run`` options a ``{"coordinate": {...}}`` event may set (no file paths: the data is the
#: embedded default or a synthetic net; AWS settings come from the function's environment).
COORDINATE_OPTIONS = frozenset({
    "workers", "channel", "invoker", "deployment", "images", "synthetic", "seed", "partition",
    "fanout", "batch_size", "receive_timeout", "run_timeout", "memory_mb", "architecture"})


def coordinate(options: Mapping) -> dict:
    """The handler's coordinator mode: ``fsd-inference run`` with ``options`` (its long options
    without dashes, e.g. ``{"workers": 8, "channel": "queue"}``; invoker ``lambda`` unless
    given), answering the run's JSON."""
    from fsd_runtime import cli

    if not isinstance(options, Mapping):
        raise ValueError(f"'coordinate' must be an object of run options, got {options!r}")
    unknown = sorted(set(options) - COORDINATE_OPTIONS)
    if unknown:
        raise ValueError(f"'coordinate' has options a coordinator event may not set: {unknown}; "
                         f"allowed: {sorted(COORDINATE_OPTIONS)}")
    if not options.get("workers") or options.get("channel") not in AWS_CHANNELS:
        raise ValueError("'coordinate' needs 'workers' and 'channel' (queue or object)")
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
    if not args.workers or args.channel not in AWS_CHANNELS:
        raise ValueError("'coordinate' needs 'workers' and 'channel' (queue or object)")
    return cli.run_distributed(args, cli.load_data(args))
