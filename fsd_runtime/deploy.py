"""``fsd-inference deploy`` / ``teardown``: the standing AWS resources of a deployment, idempotently.

A deployment named ``NAME`` is: an S3 bucket (shares, results, object-channel
chunks), SNS topics ``NAME-t{i}``, one SQS queue per worker slot ``NAME-w{j}``
whose policy admits only this deployment's topics, raw-delivery subscriptions
filtered on the target worker, the kernels layer (zip from ``layer.zip.sh``),
the worker function and an IAM role whose inline policy reaches only these
resources. Every step first reads what exists and changes only what differs,
so a second ``deploy`` changes nothing and ``teardown`` may run any number of
times. :mod:`fsd_runtime.template` emits the same set as a SAM template.
"""
from __future__ import annotations

import base64
import glob
import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

from botocore.exceptions import ClientError

#: ``clients("s3")`` -> a boto3 client (see :func:`fsd_runtime.aws.client`).
ClientFactory = Callable[[str], Any]

ARCHITECTURES = ("x86_64", "arm64")
HANDLER = "fsd_runtime.handler.handler"
#: The message attribute the queue channel sets to the target worker (subscriptions filter on it).
TARGET_ATTRIBUTE = "target"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")


class DeployError(ValueError):
    """A deployment setting is invalid or a needed input (e.g. the layer zip) is missing."""


@dataclass(frozen=True)
class DeploySettings:
    """What to deploy; every resource name derives from ``name``."""

    name: str = "fsd-inference"
    architecture: str = "x86_64"
    python: str = "3.13"
    memory_mb: int = 2048
    timeout_s: int = 900
    topics: int = 4
    workers: int = 8
    layer_zip: str | None = None

    def __post_init__(self):
        if not _NAME_PATTERN.match(self.name):
            raise DeployError(f"deployment name must be 3-32 of [a-z0-9-], starting with a letter: {self.name!r}")
        if self.architecture not in ARCHITECTURES:
            raise DeployError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if not re.fullmatch(r"3\.\d{1,2}", self.python):
            raise DeployError(f"python must look like 3.13, not {self.python!r}")
        if not 128 <= self.memory_mb <= 10240:
            raise DeployError(f"memory_mb must be in 128..10240 (Lambda's range), not {self.memory_mb}")
        if not 1 <= self.timeout_s <= 900:
            raise DeployError(f"timeout_s must be in 1..900 (Lambda's range), not {self.timeout_s}")
        if not 1 <= self.topics <= 100:
            raise DeployError(f"topics must be in 1..100, not {self.topics}")
        if not 1 <= self.workers <= 1000:
            raise DeployError(f"workers must be in 1..1000, not {self.workers}")


@dataclass(frozen=True)
class Names:
    """The concrete names and ARNs of a deployment in one account and region."""

    settings: DeploySettings
    account: str
    region: str
    partition: str = "aws"
    topics: list[str] = field(init=False)
    queues: list[str] = field(init=False)

    def __post_init__(self):
        s = self.settings
        object.__setattr__(self, "topics", [f"{s.name}-t{i}" for i in range(s.topics)])
        object.__setattr__(self, "queues", [f"{s.name}-w{j}" for j in range(s.workers)])

    @property
    def function(self) -> str:
        return self.settings.name

    @property
    def role(self) -> str:
        return f"{self.settings.name}-worker"

    @property
    def policy(self) -> str:
        return f"{self.settings.name}-least-privilege"

    @property
    def layer(self) -> str:
        s = self.settings
        return f"{s.name}-kernels-{s.architecture}-py{s.python.replace('.', '')}"

    @property
    def bucket(self) -> str:
        return f"{self.settings.name}-{self.account}-{self.region}"

    def arn(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account}:{resource}"

    def topic_arns(self) -> list[str]:
        return [self.arn("sns", t) for t in self.topics]

    def queue_arn(self, queue: str) -> str:
        return self.arn("sqs", queue)

    def function_arn(self) -> str:
        return self.arn("lambda", f"function:{self.function}")


def names_for(settings: DeploySettings, clients: ClientFactory) -> Names:
    """Names in the account and region the clients point at."""
    sts = clients("sts")
    identity = sts.get_caller_identity()
    arn_partition = identity["Arn"].split(":")[1]
    return Names(settings, identity["Account"], sts.meta.region_name, arn_partition)


def trust_policy() -> dict:
    """Only the Lambda service may assume the worker role."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
        "Action": "sts:AssumeRole"}]}


def least_privilege_policy(names: Names) -> dict:
    """What a worker does and nothing more: its own logs, the deployment's bucket, publishing to
    its topics, reading its queues, and invoking its own function (the tree launch). Run-scoped
    queues are named ``NAME-...`` too, so the queue statements cover them by prefix."""
    prefix = names.settings.name
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "Logs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [names.arn("logs", f"log-group:/aws/lambda/{names.function}"),
                      names.arn("logs", f"log-group:/aws/lambda/{names.function}:*")]},
        {"Sid": "Bucket", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:{names.partition}:s3:::{names.bucket}"]},
        {"Sid": "Objects", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": [f"arn:{names.partition}:s3:::{names.bucket}/*"]},
        {"Sid": "Publish", "Effect": "Allow", "Action": ["sns:Publish"],
         "Resource": [names.arn("sns", f"{prefix}-*")]},
        {"Sid": "Receive", "Effect": "Allow",
         "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueUrl",
                    "sqs:GetQueueAttributes"],
         "Resource": [names.arn("sqs", f"{prefix}-*")]},
        {"Sid": "TreeLaunch", "Effect": "Allow", "Action": ["lambda:InvokeFunction"],
         "Resource": [names.function_arn()]},
    ]}


def queue_policy(names: Names, queue: str) -> dict:
    """SNS may deliver into ``queue`` only from this deployment's topics."""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "FromDeploymentTopics", "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"}, "Action": "sqs:SendMessage",
        "Resource": names.queue_arn(queue),
        "Condition": {"ArnEquals": {"aws:SourceArn": names.topic_arns()}}}]}


def subscription_attributes(worker: int) -> dict[str, str]:
    """Raw delivery (no SNS JSON envelope) and only the messages addressed to ``worker``."""
    return {"RawMessageDelivery": "true",
            "FilterPolicy": json.dumps({TARGET_ATTRIBUTE: [str(worker)]})}


def function_zip() -> bytes:
    """The function's own code: only a marker, since fsd_runtime and the kernels come from the layer.
    Built byte-for-byte the same every time (fixed timestamp) so redeploying changes nothing."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("fsd_inference_function.txt", date_time=(2024, 1, 1, 0, 0, 0))
        zf.writestr(info, f"FSD-Inference worker; handler {HANDLER} is in the kernels layer.\n")
    return buf.getvalue()


def code_sha256(blob: bytes) -> str:
    """Lambda's CodeSha256: base64 of the SHA-256 of the zip."""
    return base64.b64encode(hashlib.sha256(blob).digest()).decode()


def find_layer_zip(settings: DeploySettings, dist: str = "dist") -> str:
    """The layer zip ``layer.zip.sh`` built for this architecture and Python."""
    if settings.layer_zip:
        path = settings.layer_zip
    else:
        path = os.path.join(dist, f"fsd-inference-layer-{settings.architecture}-py{settings.python}.zip")
    if not os.path.isfile(path):
        found = sorted(glob.glob(os.path.join(dist, "fsd-inference-layer-*.zip")))
        raise DeployError(
            f"layer zip {path} not found: build it with ./layer.zip.sh --arch {settings.architecture} "
            f"--python {settings.python} (or pass --layer-zip); zips in {dist}/: {found or 'none'}")
    return path


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _absent(exc: ClientError, *codes: str) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(exc) in codes or status == 404


class _Deployer:
    """Brings one resource kind at a time to its wanted state and logs what it changed."""

    def __init__(self, settings: DeploySettings, clients: ClientFactory, layer_zip: bytes):
        self.settings = settings
        self.names = names_for(settings, clients)
        self.clients = clients
        self.layer_zip = layer_zip
        self.changes: list[str] = []

    def run(self) -> list[str]:
        role_arn = self.role()
        self.bucket()
        topic_arns = self.topics()
        self.queues_and_subscriptions(topic_arns)
        layer_arn = self.layer()
        self.function(role_arn, layer_arn)
        return self.changes

    def role(self) -> str:
        iam, n = self.clients("iam"), self.names
        try:
            arn = iam.get_role(RoleName=n.role)["Role"]["Arn"]
        except ClientError as exc:
            if not _absent(exc, "NoSuchEntity"):
                raise
            arn = iam.create_role(RoleName=n.role, AssumeRolePolicyDocument=json.dumps(trust_policy()),
                                  Description=f"FSD-Inference workers of {n.settings.name}")["Role"]["Arn"]
            self.changes.append(f"created IAM role {n.role}")
        wanted = least_privilege_policy(n)
        try:
            current = iam.get_role_policy(RoleName=n.role, PolicyName=n.policy)["PolicyDocument"]
            current = json.loads(current) if isinstance(current, str) else current
        except ClientError as exc:
            if not _absent(exc, "NoSuchEntity"):
                raise
            current = None
        if current != wanted:
            iam.put_role_policy(RoleName=n.role, PolicyName=n.policy, PolicyDocument=json.dumps(wanted))
            self.changes.append(f"set policy {n.policy} on role {n.role}")
        return arn

    def bucket(self) -> None:
        s3, n = self.clients("s3"), self.names
        try:
            s3.head_bucket(Bucket=n.bucket)
            return
        except ClientError as exc:
            if not _absent(exc, "NoSuchBucket", "404"):
                raise
        args = {} if n.region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": n.region}}
        s3.create_bucket(Bucket=n.bucket, **args)
        s3.put_public_access_block(Bucket=n.bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True,
            "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
        self.changes.append(f"created bucket {n.bucket}")

    def topics(self) -> list[str]:
        sns, n = self.clients("sns"), self.names
        existing = set(_all_topic_arns(sns))
        for name, arn in zip(n.topics, n.topic_arns()):
            if arn not in existing:
                sns.create_topic(Name=name)
                self.changes.append(f"created topic {name}")
        return n.topic_arns()

    def queues_and_subscriptions(self, topic_arns: list[str]) -> None:
        sqs, sns, n = self.clients("sqs"), self.clients("sns"), self.names
        subscribed = {arn: {s["Endpoint"] for s in _subscriptions(sns, arn)} for arn in topic_arns}
        for worker, queue in enumerate(n.queues):
            policy = queue_policy(n, queue)
            try:
                url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
                current = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])
                if json.loads(current.get("Attributes", {}).get("Policy", "null")) != policy:
                    sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
                    self.changes.append(f"set policy of queue {queue}")
            except ClientError as exc:
                if not _absent(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                    raise
                sqs.create_queue(QueueName=queue, Attributes={
                    "Policy": json.dumps(policy), "MessageRetentionPeriod": "3600",
                    "ReceiveMessageWaitTimeSeconds": "20"})
                self.changes.append(f"created queue {queue}")
            queue_arn = n.queue_arn(queue)
            for topic_arn in topic_arns:
                if queue_arn not in subscribed[topic_arn]:
                    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
                                  Attributes=subscription_attributes(worker))
                    self.changes.append(f"subscribed {queue} to {topic_arn.rsplit(':', 1)[1]}")

    def layer(self) -> str:
        lam, n = self.clients("lambda"), self.names
        latest = _latest_layer_version(lam, n.layer)
        if latest is not None:
            content = lam.get_layer_version(LayerName=n.layer, VersionNumber=latest["Version"])
            if content.get("Content", {}).get("CodeSha256") == code_sha256(self.layer_zip):
                return latest["LayerVersionArn"]
        published = lam.publish_layer_version(
            LayerName=n.layer, Content={"ZipFile": self.layer_zip},
            Description=f"FSD-Inference kernels, fsd_runtime and numpy ({n.settings.architecture})",
            CompatibleRuntimes=[f"python{n.settings.python}"],
            CompatibleArchitectures=[n.settings.architecture])
        self.changes.append(f"published layer {n.layer} version {published['Version']}")
        return published["LayerVersionArn"]

    def function_config(self, role_arn: str, layer_arn: str) -> dict:
        s = self.settings
        return {"Runtime": f"python{s.python}", "Handler": HANDLER, "Role": role_arn,
                "MemorySize": s.memory_mb, "Timeout": s.timeout_s, "Layers": [layer_arn],
                "Environment": {"Variables": {"FSD_KERNELS_BACKEND": "native"}}}

    def function(self, role_arn: str, layer_arn: str) -> None:
        lam, n, s = self.clients("lambda"), self.names, self.settings
        wanted = self.function_config(role_arn, layer_arn)
        code = function_zip()
        try:
            current = lam.get_function(FunctionName=n.function)["Configuration"]
        except ClientError as exc:
            if not _absent(exc, "ResourceNotFoundException"):
                raise
            _retry_role_propagation(lambda: lam.create_function(
                FunctionName=n.function, Code={"ZipFile": code}, Architectures=[s.architecture],
                Description="FSD-Inference worker", **wanted))
            self.changes.append(f"created function {n.function}")
            return
        have = {"Runtime": current.get("Runtime"), "Handler": current.get("Handler"),
                "Role": current.get("Role"), "MemorySize": current.get("MemorySize"),
                "Timeout": current.get("Timeout"),
                "Layers": [layer["Arn"] for layer in current.get("Layers", [])],
                "Environment": {"Variables": current.get("Environment", {}).get("Variables", {})}}
        if have != wanted:
            lam.update_function_configuration(FunctionName=n.function, **wanted)
            _wait_updated(lam, n.function)
            self.changes.append(f"updated configuration of function {n.function}")
        if (current.get("CodeSha256") != code_sha256(code)
                or current.get("Architectures", ["x86_64"]) != [s.architecture]):
            lam.update_function_code(FunctionName=n.function, ZipFile=code,
                                     Architectures=[s.architecture])
            self.changes.append(f"updated code of function {n.function}")


def _all_topic_arns(sns) -> list[str]:
    return [t["TopicArn"] for page in sns.get_paginator("list_topics").paginate() for t in page["Topics"]]


def _subscriptions(sns, topic_arn: str) -> list[dict]:
    pages = sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
    return [s for page in pages for s in page["Subscriptions"]]


def _latest_layer_version(lam, layer: str) -> dict | None:
    try:
        versions = [v for page in lam.get_paginator("list_layer_versions").paginate(LayerName=layer)
                    for v in page["LayerVersions"]]
    except ClientError as exc:
        if _absent(exc, "ResourceNotFoundException"):
            return None
        raise
    return max(versions, key=lambda v: v["Version"], default=None)


def _retry_role_propagation(create: Callable[[], Any], attempts: int = 10) -> None:
    """A new IAM role takes seconds to become assumable by Lambda; retry only that error."""
    for attempt in range(attempts):
        try:
            create()
            return
        except ClientError as exc:
            if (_error_code(exc) != "InvalidParameterValueException" or "role" not in str(exc).lower()
                    or attempt == attempts - 1):
                raise
            time.sleep(min(2 ** attempt, 10))


def _wait_updated(lam, function: str, timeout: float = 60.0) -> None:
    """Lambda refuses a code update while a configuration update is in progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = lam.get_function_configuration(FunctionName=function).get("LastUpdateStatus", "Successful")
        if status != "InProgress":
            return
        time.sleep(1)
    raise DeployError(f"function {function} still updating after {timeout:.0f} s")


def deploy(settings: DeploySettings, clients: ClientFactory, layer_zip: bytes | None = None) -> list[str]:
    """Create or update everything of the deployment; returns what changed (empty when up to date)."""
    if layer_zip is None:
        with open(find_layer_zip(settings), "rb") as f:
            layer_zip = f.read()
    return _Deployer(settings, clients, layer_zip).run()


def teardown(settings: DeploySettings, clients: ClientFactory) -> list[str]:
    """Delete everything of the deployment that exists; returns what was deleted."""
    n = names_for(settings, clients)
    removed: list[str] = []
    lam, sns, sqs, s3, iam = (clients(s) for s in ("lambda", "sns", "sqs", "s3", "iam"))
    if _ignore_absent(lambda: lam.delete_function(FunctionName=n.function), "ResourceNotFoundException"):
        removed.append(f"function {n.function}")
    latest = _latest_layer_version(lam, n.layer)
    while latest is not None:
        lam.delete_layer_version(LayerName=n.layer, VersionNumber=latest["Version"])
        removed.append(f"layer {n.layer} version {latest['Version']}")
        latest = _latest_layer_version(lam, n.layer)
    existing_topics = set(_all_topic_arns(sns))
    for topic_arn in n.topic_arns():
        if topic_arn in existing_topics:
            for sub in _subscriptions(sns, topic_arn):
                if sub["SubscriptionArn"].startswith("arn:"):
                    sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
            sns.delete_topic(TopicArn=topic_arn)
            removed.append(f"topic {topic_arn.rsplit(':', 1)[1]} and its subscriptions")
    for queue in n.queues:
        try:
            url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
        except ClientError as exc:
            if _absent(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                continue
            raise
        sqs.delete_queue(QueueUrl=url)
        removed.append(f"queue {queue}")
    if _empty_and_delete_bucket(s3, n.bucket):
        removed.append(f"bucket {n.bucket}")
    if _ignore_absent(lambda: iam.delete_role_policy(RoleName=n.role, PolicyName=n.policy), "NoSuchEntity"):
        removed.append(f"policy {n.policy}")
    if _ignore_absent(lambda: iam.delete_role(RoleName=n.role), "NoSuchEntity"):
        removed.append(f"IAM role {n.role}")
    return removed


def _ignore_absent(call: Callable[[], Any], *codes: str) -> bool:
    """Run a delete; False if the thing was already gone."""
    try:
        call()
        return True
    except ClientError as exc:
        if _absent(exc, *codes):
            return False
        raise


def _empty_and_delete_bucket(s3, bucket: str) -> bool:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _absent(exc, "NoSuchBucket", "404"):
            return False
        raise
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)
    return True
