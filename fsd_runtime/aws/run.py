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

import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping

from botocore.exceptions import BotoCoreError, ClientError

import fsd_runtime
from fsd_runtime.aws import clients as aws, cost, deploy, invokers, template
from fsd_runtime.channels.queue import topic_name
from fsd_runtime.aws.s3storage import S3Storage

from fsd_runtime.aws import AWS_CHANNELS, INVOKERS
#: What a worker's own store calls are (fsd_runtime.worker.run_from_event): HEAD its share (billed as
#: a GET), create its claim, GET its share,
#: PUT its metrics and its result. The coordinator's calls are counted as they happen.
WORKER_STORE_CALLS = {"s3_get_requests": 2, "s3_put_requests": 3}


@dataclass(frozen=True)
class RunOptions:
    """What ``run --channel queue|object`` hands the AWS side (typed: the argparse Namespace
    stops at the CLI functions of this module)."""

    channel: str
    invoker: str = "local"
    deployment: str = "fsd-inference"
    aws: aws.AwsSettings = aws.AwsSettings()
    #: The memory size priced off Lambda (with ``--invoker lambda``: the deployed one).
    memory_mb: int = 2048
    architecture: str = "x86_64"
    fanout: int = 2

    def __post_init__(self):
        if self.channel not in AWS_CHANNELS:
            raise ValueError(f"--invoker needs --channel queue or object, not {self.channel}")
        if self.invoker not in INVOKERS:
            raise ValueError(f"invoker must be one of {INVOKERS}, not {self.invoker!r}")


@dataclass(frozen=True)
class CommandOptions:
    """``deploy`` / ``teardown`` / ``cleanup`` as typed options."""

    command: str
    settings: deploy.DeploySettings
    aws: aws.AwsSettings = aws.AwsSettings()
    template_only: bool = False
    older_than_s: float = 0.0


def aws_settings(args) -> aws.AwsSettings:
    """CLI layer: the AWS options of a parsed command line."""
    return aws.AwsSettings(region=args.region, profile=args.profile, endpoint_url=args.endpoint_url)


def run_options(args) -> RunOptions:
    """CLI layer: a parsed ``run`` command line as :class:`RunOptions`."""
    return RunOptions(channel=args.channel, invoker=args.invoker or "local", deployment=args.deployment,
                      aws=aws_settings(args), memory_mb=args.memory_mb, architecture=args.architecture,
                      fanout=getattr(args, "fanout", 2))


def prepared_store(options: RunOptions) -> S3Storage:
    """The deployment's bucket, where ``run --prepared s3:PREFIX`` finds a prepared model (one a
    run uploaded to ``models/{digest}``)."""
    try:
        names = deploy.names_for(deploy.DeploySettings(name=options.deployment), options.aws)
    except (ClientError, BotoCoreError) as exc:
        raise deploy.DeployError(f"cannot reach AWS to find deployment {options.deployment!r}: {exc}") from None
    return S3Storage(names.bucket, options.aws)


def command_options(args) -> CommandOptions:
    """CLI layer: a parsed ``deploy``/``teardown``/``cleanup`` command line."""
    return CommandOptions(command=args.command, settings=deploy_settings(args), aws=aws_settings(args),
                          template_only=getattr(args, "template_only", False),
                          older_than_s=getattr(args, "older_than", 0.0))


def deploy_settings(args) -> deploy.DeploySettings:
    return deploy.DeploySettings(
        name=args.deployment, architecture=args.architecture, python=args.python,
        memory_mb=getattr(args, "memory_mb", 2048), timeout_s=getattr(args, "timeout", 900),
        topics=args.topics, lambda_function=not getattr(args, "no_lambda", False),
        coordinator_mode=getattr(args, "coordinator_mode", False),
        layer_zip=getattr(args, "layer_zip", None), max_workers=getattr(args, "max_workers", 64),
        max_fanout=getattr(args, "max_fanout", 16),
        reserved_concurrency=getattr(args, "reserved_concurrency", 100))


def run_command(options: CommandOptions) -> int:
    """``deploy`` / ``teardown`` / ``cleanup``: print what changed, one line each (or the template)."""
    settings = options.settings
    if options.template_only:
        print(template.render(settings))
        return 0
    if options.command == "deploy":
        lines = deploy.deploy(settings, options.aws) or ["up to date: nothing changed"]
    elif options.command == "cleanup":
        if not (math.isfinite(options.older_than_s) and options.older_than_s >= 0):
            raise ValueError(f"--older-than must be finite seconds >= 0, not {options.older_than_s}")
        lines = [f"deleted {r}" for r in deploy.cleanup(settings, options.aws, options.older_than_s)] \
            or ["nothing to delete"]
    else:
        lines = [f"deleted {r}" for r in deploy.teardown(settings, options.aws)] or ["nothing to delete"]
    print("\n".join(lines))
    return 0


def cli_command(args) -> int:
    """``deploy`` / ``teardown`` from the CLI: exit 2 with one clear line on any failure."""
    try:
        return run_command(command_options(args))
    except (ValueError, ClientError, BotoCoreError) as exc:
        print(f"fsd-inference: error: {exc}", file=sys.stderr)
        return 2


class AwsRun:
    """One run's AWS wiring; a context manager (an RIE pool lives as long as the run)."""

    def __init__(self, options: RunOptions, n_workers: int):
        self.channel_kind = options.channel
        self.invoker = options.invoker
        self.n_workers = n_workers
        self.memory_mb = options.memory_mb
        self.memory_source = "--memory-mb (the run was not on Lambda)"
        self.architecture = options.architecture
        self.fanout = options.fanout
        self.started_ms = int(time.time() * 1000)
        self.settings = options.aws
        try:
            self.names = deploy.names_for(deploy.DeploySettings(name=options.deployment), self.settings)
        except (ClientError, BotoCoreError) as exc:
            raise deploy.DeployError(f"cannot reach AWS to find deployment {options.deployment!r}: {exc}") from None
        on_lambda = self.invoker == "lambda"
        self.worker_settings = aws.AwsSettings(region=self.names.region) if on_lambda else self.settings
        self.pool: invokers.RiePool | None = None
        self.storage = S3Storage(self.names.bucket, self.settings, worker_settings=self.worker_settings)

    def __enter__(self) -> "AwsRun":
        self._check_deployed()
        try:  # queues of runs whose coordinator died more than a day ago (objects expire by themselves)
            deploy.sweep_stale_queues(self.names, self.settings)
        except (ClientError, BotoCoreError):
            pass  # the sweep is a courtesy: a run must not fail over it
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
                function = lam.get_function(FunctionName=self.names.function)["Configuration"]
            except ClientError as exc:
                raise deploy.DeployError(f"deployment {self.names.settings.name!r} has no function: run "
                                         f"`fsd-inference deploy` first ({aws.error_code(exc)})") from None
            self.memory_mb = int(function.get("MemorySize", self.memory_mb))
            self.memory_source = "the deployed function's MemorySize"
            self.architecture = (function.get("Architectures") or [self.architecture])[0]
            env = function.get("Environment", {}).get("Variables", {})
            limit = int(env.get(deploy.ENV_MAX_WORKERS, "0") or 0)
            if limit and self.n_workers > limit:
                raise deploy.DeployError(f"{self.n_workers} workers exceed deployment "
                                         f"{self.names.settings.name!r}'s limit of {limit} (redeploy with "
                                         "--max-workers)")

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

    def _sizes(self, kind: str) -> tuple[str | None, dict[int, int]]:
        """The run id and per-worker bytes of the run's ``shares`` or ``results`` the store moved."""
        found, run = {}, None
        for key, size in self.storage.sizes.items():
            match = re.fullmatch(rf"runs/([A-Za-z0-9_-]+)/{kind}/(\d+)\.npz", key)
            if match:
                run, found[int(match[2])] = match[1], size
        return run, found

    def cost(self, traffic: Mapping, metrics: list[dict], n_images: int) -> dict:
        """The run's cost: requests as counted (the channel's; the store's: the coordinator's as
        made, each worker's by :data:`WORKER_STORE_CALLS` and a prepared model's reads); Lambda
        durations billed (from the invocations' REPORT log lines, with ``--invoker lambda``) or
        modelled term by term (:func:`fsd_runtime.aws.cost.duration_terms`; a worker's share
        bytes with its prepared model's segments) under every latency preset, a range."""
        requests: Counter = Counter(traffic.get("channel_requests", {}))
        requests.update(cost.s3_counters(self.storage.call.attempts))
        requests.update({k: v * self.n_workers for k, v in WORKER_STORE_CALLS.items()})
        # a prepared model's run: each worker also HEADs and GETs model.json and GETs its segments
        requests.update({"s3_get_requests": sum(int(g) for g in traffic.get("model_gets_per_worker") or ())})
        run_id, share_bytes = self._sizes("shares")
        # ... and downloads its segments (weights and plans) besides its small inputs share
        for w, size in enumerate(traffic.get("model_bytes_per_worker") or ()):
            share_bytes[w] = share_bytes.get(w, 0) + int(size)
        _, result_bytes = self._sizes("results")
        bills, terms = {}, {}
        for name, preset in cost.PRESETS.items():
            model = cost.duration_terms(metrics, self.channel_kind, latency=preset, memory_mb=self.memory_mb,
                                        fanout=self.fanout, share_bytes=share_bytes, result_bytes=result_bytes,
                                        batches=int(traffic.get("batches") or 1))
            terms[name] = model
            bills[name] = cost.run_cost(requests, model["per_worker"], n_images=n_images,
                                        memory_mb=self.memory_mb, architecture=self.architecture)
        billed = self.billed_durations(run_id) if self.invoker == "lambda" and run_id else None
        if billed is not None:
            out = cost.run_cost(requests, billed, n_images=n_images, memory_mb=self.memory_mb,
                                architecture=self.architecture)
            out["duration"] = "billed: each worker's Billed Duration from its REPORT log line"
        else:
            out = dict(bills[cost.LATENCY.name])
            out["duration"] = ("modelled: the run was not on Lambda" if self.invoker != "lambda" else
                               "modelled: REPORT log lines of the workers not found in time")
        out["range"] = {name: {"usd": b["usd"], "usd_per_10k_inferences": b["usd_per_10k_inferences"],
                               "gb_seconds": b["gb_seconds"], "slowest_worker_s": max(terms[name]["per_worker"])}
                        for name, b in bills.items()}
        out["duration_terms"] = {name: {"seconds": t["terms"], "latency": t["latency"]}
                                 for name, t in terms.items()}
        out["sources"] = {"requests": "measured: counted as the calls were made (channels, run store)",
                          "prices": f"list prices, {cost.PRICES.region}, read {cost.PRICES.as_of}",
                          "memory_mb": f"{self.memory_source}; CPU share {cost.cpu_share(self.memory_mb):.3f}",
                          "duration_terms": cost.TERM_SOURCES}
        return out

    def billed_durations(self, run_id: str, wait_s: float = 60.0) -> list[float] | None:
        """Each worker's billed seconds from CloudWatch Logs: the handler's ``worker starting``
        line ties a request id to (run, worker); Lambda's ``REPORT`` line of that request id has
        its Billed Duration. None when not every worker's line arrived within ``wait_s``."""
        return billed_from_logs(aws.client("logs", self.settings), self.names.function, run_id,
                                self.n_workers, self.started_ms, wait_s)



def billed_from_logs(logs, function: str, run_id: str, n_workers: int, since_ms: int,
                     wait_s: float = 60.0, poll_s: float = 2.0) -> list[float] | None:
    """Billed seconds per worker of one run, read from the function's log group (see
    :meth:`AwsRun.billed_durations`); None if some worker's REPORT line is missing after ``wait_s``."""
    group = f"/aws/lambda/{function}"
    deadline = time.monotonic() + wait_s
    while True:
        worker_of: dict[str, int] = {}
        reports: dict[str, dict] = {}
        kwargs = {"logGroupName": group, "startTime": since_ms}
        try:
            while True:
                page = logs.filter_log_events(**kwargs)
                for event in page.get("events", []):
                    message = event.get("message", "")
                    report = cost.parse_report(message)
                    if report is not None:
                        reports[report["request_id"]] = report
                        continue
                    start = message.find("{")
                    if start < 0 or run_id not in message:
                        continue
                    try:
                        line = json.loads(message[start:])
                    except (ValueError, RecursionError):
                        continue
                    if (isinstance(line, dict) and line.get("message") == "worker starting"
                            and line.get("run") == run_id and isinstance(line.get("worker"), int)
                            and line.get("request_id")):
                        worker_of[line["request_id"]] = line["worker"]
                if not page.get("nextToken"):
                    break
                kwargs["nextToken"] = page["nextToken"]
        except ClientError as exc:
            if aws.error_code(exc) != "ResourceNotFoundException":
                raise
        billed: dict[int, float] = {}
        for request, worker in worker_of.items():  # a duplicate invocation is billed too
            if request in reports:
                billed[worker] = billed.get(worker, 0.0) + reports[request]["billed_s"]
        if sorted(billed) == list(range(n_workers)):
            return [billed[w] for w in range(n_workers)]
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)
