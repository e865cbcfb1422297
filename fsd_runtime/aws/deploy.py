"""``fsd-inference deploy`` / ``teardown``: the standing AWS resources of a deployment, idempotently.

A deployment named ``NAME`` is: the S3 bucket ``NAME-{account}-{region}``
(shares, results, metrics, object-channel chunks; TLS-only bucket policy),
the SNS topics ``NAME_t{i}`` the queue channel publishes to, and, unless
``lambda_function`` is off (local and RIE invokers need only bucket and
topics): the kernels layer (zip from ``layer.zip.sh``), the worker function
(reserved concurrency, the deployment's limits in its environment) and its
IAM role with a least-privilege inline policy.

Isolation: a deployment name is ``[a-z0-9-]`` only and every name derived
from it joins it to the rest with ``_`` (:data:`SEP`), which a name cannot
contain; the bucket (S3 allows no ``_``) has a fixed-shape suffix and is
only ever named exactly. So no IAM pattern of one deployment matches a
resource of another, even when one name is a prefix of the other
(``fsd`` and ``fsd-inference``); ``tests/test_deploy.py`` checks this by
matching every pattern against the other deployment's names.

Queues and their subscriptions are *run-scoped*: the coordinator creates one
queue per worker for each run (``QueueChannel.create_run``: policy admitting
only this deployment's topics, raw delivery, filter on run and target) and
deletes them at the end, so concurrent runs never share a queue and no run
reads another's stale messages. ``teardown`` also sweeps run queues a
crashed coordinator left behind (those whose policy names this deployment's
topics).

Every step reads what exists first and changes only what differs: a second
``deploy`` changes nothing; ``teardown`` may run any number of times.
:mod:`fsd_runtime.aws.template` emits the same resources as a SAM template.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

from botocore.exceptions import ClientError

from fsd_runtime.aws import clients as aws
from fsd_runtime.channels.queue import QueueConfig, QueueResources, topic_name
from fsd_runtime.events import MAX_FANOUT

from fsd_runtime.aws import ARCHITECTURES  # noqa: E402
HANDLER = "fsd_runtime.aws.handler.handler"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,22}[a-z0-9]$")
#: Joins a deployment name to what follows it in every derived name; a name cannot contain it.
SEP = "_"
#: The deployment's limits a worker event is held to inside Lambda (fsd_runtime.aws.handler).
ENV_DEPLOYMENT, ENV_BUCKET, ENV_MAX_WORKERS, ENV_MAX_FANOUT = (
    "FSD_DEPLOYMENT", "FSD_BUCKET", "FSD_MAX_WORKERS", "FSD_MAX_FANOUT")


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
    #: Off: only bucket and topics (enough for the local and RIE invokers).
    lambda_function: bool = True
    #: Also let the function coordinate runs (the handler's ``{"coordinate": ...}`` mode), which
    #: needs the rights to create and delete run queues and subscriptions and to clean up.
    coordinator_mode: bool = False
    layer_zip: str | None = None
    #: Most workers one run may use, and most tree children one worker may start (held to by
    #: the handler inside Lambda, so a forged event cannot fan out further).
    max_workers: int = 64
    max_fanout: int = 16
    #: Concurrent executions reserved for (and capping) the function; 0: none reserved.
    reserved_concurrency: int = 100
    #: The bucket refuses requests without TLS. None: on, except when the AWS endpoint itself is
    #: plain http (a local AWS-API server, which cannot serve TLS and enforces bucket policies).
    tls_only: bool | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise DeployError("deployment name must be 3-24 of [a-z0-9-], starting with a letter "
                              f"(it prefixes bucket, topic and queue names): {self.name!r}")
        if self.architecture not in ARCHITECTURES:
            raise DeployError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if not re.fullmatch(r"3\.\d{1,2}", str(self.python)):
            raise DeployError(f"python must look like 3.13, not {self.python!r}")
        if not 128 <= self.memory_mb <= 10240:
            raise DeployError(f"memory_mb must be in 128..10240 (Lambda's range), not {self.memory_mb}")
        if not 1 <= self.timeout_s <= 900:
            raise DeployError(f"timeout_s must be in 1..900 (Lambda's range), not {self.timeout_s}")
        if not 1 <= self.topics <= 100:
            raise DeployError(f"topics must be in 1..100, not {self.topics}")
        if not 1 <= self.max_workers <= 4096:
            raise DeployError(f"max_workers must be in 1..4096, not {self.max_workers}")
        if not 1 <= self.max_fanout <= MAX_FANOUT:
            raise DeployError(f"max_fanout must be in 1..{MAX_FANOUT}, not {self.max_fanout}")
        if not 0 <= self.reserved_concurrency <= 10000:
            raise DeployError(f"reserved_concurrency must be in 0..10000, not {self.reserved_concurrency}")
        needed = self.max_workers + (1 if self.coordinator_mode else 0)
        if self.reserved_concurrency and self.reserved_concurrency < needed:
            raise DeployError(f"reserved_concurrency {self.reserved_concurrency} is below what one run of "
                              f"max_workers={self.max_workers} needs ({needed})")


@dataclass(frozen=True)
class Names:
    """The concrete names and ARNs of a deployment in one account and region."""

    settings: DeploySettings
    account: str
    region: str
    partition: str = "aws"

    @property
    def function(self) -> str:
        return self.settings.name

    @property
    def role(self) -> str:
        return f"{self.settings.name}{SEP}worker"

    @property
    def policy(self) -> str:
        return f"{self.settings.name}{SEP}least-privilege"

    @property
    def layer(self) -> str:
        s = self.settings
        return f"{s.name}{SEP}kernels-{s.architecture}-py{s.python.replace('.', '')}"

    @property
    def bucket(self) -> str:
        return f"{self.settings.name}-{self.account}-{self.region}"

    @property
    def topics(self) -> list[str]:
        return [topic_name(self.settings.name, i) for i in range(self.settings.topics)]

    def arn(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account}:{resource}"

    def topic_arns(self) -> list[str]:
        return [self.arn("sns", t) for t in self.topics]

    def function_arn(self) -> str:
        return self.arn("lambda", f"function:{self.function}")


def names_for(settings: DeploySettings, aws_settings: aws.AwsSettings) -> Names:
    """Names in the account and region the AWS settings point at."""
    sts = aws.client("sts", aws_settings)
    identity = sts.get_caller_identity()
    return Names(settings, identity["Account"], sts.meta.region_name, identity["Arn"].split(":")[1])


def trust_policy() -> dict:
    """Only the Lambda service may assume the worker role."""
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"},
        "Action": "sts:AssumeRole"}]}


#: Key prefixes of run-scoped objects: the run store's and the object channel's (defaults).
RUN_PREFIXES = ("runs/", "fsd-runs/")


def run_object_arns(names: Names) -> list[str]:
    """The run-scoped keys of the bucket (run store and object channel prefixes), as ARNs."""
    return [f"arn:{names.partition}:s3:::{names.bucket}/{prefix}*" for prefix in RUN_PREFIXES]


def run_queue_arn(names: Names) -> str:
    """Every run queue of this deployment (``NAME_{run}_{worker}``) and nothing else."""
    return names.arn("sqs", f"{names.settings.name}{SEP}*")


def least_privilege_policy(names: Names) -> dict:
    """What a worker does and nothing more: write its own logs; read run objects and list only
    under the run prefixes; *create* run objects (PutObject only with ``If-None-Match: *``, so a
    worker can never overwrite an object of another run, or of its own; it deletes nothing);
    publish to the deployment's topics; receive from the run queues (``NAME_{run}_{worker}``);
    invoke its own function (the tree launch).

    A function has one role for all its invocations, so IAM cannot tell two runs of one
    deployment apart: a worker may read another run's objects and receive (hide) its messages
    of the same deployment, never overwrite or delete them (docs/aws-deploy.md, "Isolation")."""
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "Logs", "Effect": "Allow",
         "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [names.arn("logs", f"log-group:/aws/lambda/{names.function}"),
                      names.arn("logs", f"log-group:/aws/lambda/{names.function}:*")]},
        {"Sid": "ListRunPrefixes", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:{names.partition}:s3:::{names.bucket}"],
         "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in RUN_PREFIXES]}}},
        {"Sid": "ReadRunObjects", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": run_object_arns(names)},
        {"Sid": "CreateRunObjects", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": run_object_arns(names),
         "Condition": {"StringEquals": {"s3:if-none-match": "*"}}},
        {"Sid": "Publish", "Effect": "Allow", "Action": ["sns:Publish"],
         "Resource": names.topic_arns()},
        {"Sid": "RunQueues", "Effect": "Allow", "Action": ["sqs:ReceiveMessage"],
         "Resource": [run_queue_arn(names)]},
        {"Sid": "TreeLaunch", "Effect": "Allow", "Action": ["lambda:InvokeFunction"],
         "Resource": [names.function_arn()]},
    ] + (coordinator_statements(names) if names.settings.coordinator_mode else [])}


def coordinator_statements(names: Names) -> list[dict]:
    """What a coordinator adds (only with ``coordinator_mode``): run queues and their
    subscriptions created and deleted, the deployment's topics found, shares uploaded and run
    objects deleted (under the run prefixes only)."""
    return [
        {"Sid": "RunQueueLifecycle", "Effect": "Allow",
         "Action": ["sqs:CreateQueue", "sqs:DeleteQueue", "sqs:GetQueueUrl", "sqs:GetQueueAttributes",
                    "sqs:SetQueueAttributes"],
         "Resource": [run_queue_arn(names)]},
        {"Sid": "RunSubscriptions", "Effect": "Allow",
         "Action": ["sns:Subscribe", "sns:Unsubscribe", "sns:ListSubscriptionsByTopic"],
         "Resource": names.topic_arns()},
        {"Sid": "FindTopics", "Effect": "Allow", "Action": ["sns:ListTopics"], "Resource": ["*"]},
        {"Sid": "RunUploadAndCleanup", "Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
         "Resource": run_object_arns(names)},
    ]


def bucket_policy(names: Names) -> dict:
    """The bucket refuses every request that does not come over TLS."""
    bucket = f"arn:{names.partition}:s3:::{names.bucket}"
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "TlsOnly", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [bucket, f"{bucket}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]}


def function_environment(settings: DeploySettings, bucket: str) -> dict:
    """The function's environment: the native kernels, and the deployment's limits the handler
    holds every event to (deployment, bucket, most workers, most tree children)."""
    return {"FSD_KERNELS_BACKEND": "native", ENV_DEPLOYMENT: settings.name, ENV_BUCKET: bucket,
            ENV_MAX_WORKERS: str(settings.max_workers), ENV_MAX_FANOUT: str(settings.max_fanout)}


def queue_config(names: Names, aws_settings: aws.AwsSettings) -> QueueConfig:
    """The queue channel's config for runs of this deployment."""
    return QueueConfig(prefix=names.settings.name, topics=names.settings.topics, aws=aws_settings)


def lifecycle_rules() -> list[dict]:
    """Run objects expire after a day: the coordinator deletes them at the end of every run, but
    a Lambda worker still running after a failed run may write its error record later."""
    return [{"ID": f"expire-{prefix.rstrip('/')}", "Filter": {"Prefix": prefix}, "Status": "Enabled",
             "Expiration": {"Days": 1}} for prefix in RUN_PREFIXES]


def _rule_keys(rules: list[dict]) -> set[tuple]:
    """What matters of lifecycle rules (AWS may add fields of its own when it returns them)."""
    return {(r.get("ID"), r.get("Filter", {}).get("Prefix"), r.get("Status"),
             r.get("Expiration", {}).get("Days")) for r in rules}


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
    path = settings.layer_zip or os.path.join(
        dist, f"fsd-inference-layer-{settings.architecture}-py{settings.python}.zip")
    if not os.path.isfile(path):
        raise DeployError(f"layer zip {path} not found: build it with ./layer.zip.sh --arch "
                          f"{settings.architecture} --python {settings.python} (or pass --layer-zip)")
    return path


def _error_code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _absent(exc: ClientError, *codes: str) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(exc) in codes or status == 404


class _Deployer:
    """Brings one resource kind at a time to its wanted state and notes what it changed."""

    def __init__(self, settings: DeploySettings, aws_settings: aws.AwsSettings, layer_zip: bytes | None):
        self.settings = settings
        self.aws_settings = aws_settings
        self.names = names_for(settings, aws_settings)
        self.layer_zip = layer_zip
        self.changes: list[str] = []
        self._clients: dict[str, Any] = {}

    def client(self, service: str):
        """One client per service (creating a boto3 client costs ~0.3 s)."""
        if service not in self._clients:
            self._clients[service] = aws.client(service, self.aws_settings)
        return self._clients[service]

    def run(self) -> list[str]:
        if self.settings.lambda_function and self.layer_zip is None:  # fail before changing anything
            with open(find_layer_zip(self.settings), "rb") as f:
                self.layer_zip = f.read()
        self.bucket()
        self.topics()
        if self.settings.lambda_function:
            role_arn = self.role()
            self.function(role_arn, self.layer())
        return self.changes

    def bucket(self) -> None:
        s3, n = self.client("s3"), self.names
        try:
            s3.head_bucket(Bucket=n.bucket)
        except ClientError as exc:
            if not _absent(exc, "NoSuchBucket", "404"):
                raise
            location = {} if n.region == "us-east-1" else {
                "CreateBucketConfiguration": {"LocationConstraint": n.region}}
            s3.create_bucket(Bucket=n.bucket, **location)
            s3.put_public_access_block(Bucket=n.bucket, PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True,
                "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
            self.changes.append(f"created bucket {n.bucket}")
        try:
            rules = s3.get_bucket_lifecycle_configuration(Bucket=n.bucket).get("Rules", [])
        except ClientError as exc:
            if _error_code(exc) != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        try:
            current_policy = json.loads(s3.get_bucket_policy(Bucket=n.bucket)["Policy"])
        except ClientError as exc:
            if _error_code(exc) != "NoSuchBucketPolicy":
                raise
            current_policy = None
        tls_only = self.settings.tls_only
        if tls_only is None:  # the endpoint the client really uses (settings, AWS_ENDPOINT_URL*, default)
            tls_only = not str(s3.meta.endpoint_url).startswith("http://")
        if tls_only and current_policy != bucket_policy(n):
            s3.put_bucket_policy(Bucket=n.bucket, Policy=json.dumps(bucket_policy(n)))
            self.changes.append(f"set TLS-only policy of bucket {n.bucket}")
        elif not tls_only and current_policy is not None:
            s3.delete_bucket_policy(Bucket=n.bucket)
            self.changes.append(f"removed the TLS-only policy of bucket {n.bucket} (plain-http endpoint)")
        if _rule_keys(rules) != _rule_keys(lifecycle_rules()):
            s3.put_bucket_lifecycle_configuration(Bucket=n.bucket,
                                                  LifecycleConfiguration={"Rules": lifecycle_rules()})
            self.changes.append(f"set expiry of run objects in bucket {n.bucket}")

    def topics(self) -> None:
        resources = QueueResources(queue_config(self.names, self.aws_settings))
        before = set(resources.existing_topics())
        created = [arn for arn in resources.ensure_topics() if arn not in before]
        self.changes.extend(f"created topic {arn.rsplit(':', 1)[1]}" for arn in created)

    def role(self) -> str:
        iam, n = self.client("iam"), self.names
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

    def layer(self) -> str:
        lam, n = self.client("lambda"), self.names
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
                "Environment": {"Variables": function_environment(s, self.names.bucket)}}

    def function(self, role_arn: str, layer_arn: str) -> None:
        lam, n, s = self.client("lambda"), self.names, self.settings
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
            current = None
        if current is not None:
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
        self.no_async_retries(lam)
        self.reserved_concurrency(lam)

    def reserved_concurrency(self, lam) -> None:
        """Reserve (and so cap) the function's concurrent executions: a runaway fan-out is
        throttled at this number instead of taking the account's whole pool."""
        name, wanted = self.names.function, self.settings.reserved_concurrency or None
        current = lam.get_function_concurrency(FunctionName=name).get("ReservedConcurrentExecutions")
        if current == wanted:
            return
        if wanted is None:
            lam.delete_function_concurrency(FunctionName=name)
            self.changes.append(f"removed reserved concurrency of function {name}")
        else:
            lam.put_function_concurrency(FunctionName=name, ReservedConcurrentExecutions=wanted)
            self.changes.append(f"reserved concurrency {wanted} for function {name}")

    def no_async_retries(self, lam) -> None:
        """Lambda retries a failed Event invoke twice; a retried worker would run its share twice."""
        name = self.names.function
        try:
            current = lam.get_function_event_invoke_config(FunctionName=name).get("MaximumRetryAttempts")
        except ClientError as exc:
            if not _absent(exc, "ResourceNotFoundException"):
                raise
            current = None
        if current != 0:
            lam.put_function_event_invoke_config(FunctionName=name, MaximumRetryAttempts=0)
            self.changes.append(f"turned off async retries of function {name}")


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


def deploy(settings: DeploySettings, aws_settings: aws.AwsSettings | None = None,
           layer_zip: bytes | None = None) -> list[str]:
    """Create or update everything of the deployment; returns what changed (empty when up to date).
    ``layer_zip`` defaults to the zip :func:`find_layer_zip` names."""
    return _Deployer(settings, aws_settings or aws.AwsSettings(), layer_zip).run()


def teardown(settings: DeploySettings, aws_settings: aws.AwsSettings | None = None) -> list[str]:
    """Delete everything of the deployment that exists; returns what was deleted."""
    aws_settings = aws_settings or aws.AwsSettings()
    n = names_for(settings, aws_settings)
    lam, iam = aws.client("lambda", aws_settings), aws.client("iam", aws_settings)
    removed: list[str] = []
    if _delete_if_there(lambda: lam.delete_function(FunctionName=n.function), "ResourceNotFoundException"):
        removed.append(f"function {n.function}")
    latest = _latest_layer_version(lam, n.layer)
    while latest is not None:
        lam.delete_layer_version(LayerName=n.layer, VersionNumber=latest["Version"])
        removed.append(f"layer {n.layer} version {latest['Version']}")
        latest = _latest_layer_version(lam, n.layer)
    removed.extend(f"leftover run queue {q}" for q in _delete_run_queues(n, aws_settings))
    resources = QueueResources(queue_config(n, aws_settings))
    topics = resources.existing_topics()
    resources.delete_topics()
    removed.extend(f"topic {arn.rsplit(':', 1)[1]}" for arn in topics)
    if _empty_and_delete_bucket(aws.client("s3", aws_settings), n.bucket):
        removed.append(f"bucket {n.bucket}")
    if _delete_if_there(lambda: iam.delete_role_policy(RoleName=n.role, PolicyName=n.policy), "NoSuchEntity"):
        removed.append(f"policy {n.policy}")
    if _delete_if_there(lambda: iam.delete_role(RoleName=n.role), "NoSuchEntity"):
        removed.append(f"IAM role {n.role}")
    return removed


def _delete_run_queues(names: Names, aws_settings: aws.AwsSettings, older_than_s: float = 0.0) -> list[str]:
    """Queues of runs that never cleaned up: named ``NAME_...`` with a policy naming our topics,
    created at least ``older_than_s`` ago; their subscriptions to our topics go with them."""
    sqs, sns = aws.client("sqs", aws_settings), aws.client("sns", aws_settings)
    # every topic the deployment has, also beyond the settings' count (a deploy with more topics)
    ours = set(names.topic_arns()) | set(QueueResources(queue_config(names, aws_settings)).existing_topics())
    now = time.time()
    deleted: dict[str, str] = {}  # queue ARN -> url
    urls = [u for page in sqs.get_paginator("list_queues").paginate(QueueNamePrefix=f"{names.settings.name}{SEP}")
            for u in page.get("QueueUrls", [])]
    for url in urls:
        try:
            attributes = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["Policy", "QueueArn", "CreatedTimestamp"])["Attributes"]
        except ClientError as exc:
            if _absent(exc, "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                continue
            raise
        statements = json.loads(attributes.get("Policy", "{}")).get("Statement", [])
        sources = {arn for st in statements
                   for arn in _as_list(st.get("Condition", {}).get("ArnEquals", {}).get("aws:SourceArn"))}
        if sources and sources <= ours and now - float(attributes.get("CreatedTimestamp", 0)) >= older_than_s:
            deleted[attributes.get("QueueArn", "")] = url
    for topic in ours if deleted else ():
        try:
            pages = list(sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic))
        except ClientError as exc:
            if _absent(exc, "NotFound"):
                continue
            raise
        for sub in (s for page in pages for s in page.get("Subscriptions", [])):
            if sub.get("Endpoint") in deleted:
                sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
    for url in deleted.values():
        _delete_if_there(lambda: sqs.delete_queue(QueueUrl=url),
                         "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
    return sorted(url.rsplit("/", 1)[1] for url in deleted.values())


def _delete_run_objects(names: Names, aws_settings: aws.AwsSettings, older_than_s: float) -> int:
    """Objects under the run prefixes last written at least ``older_than_s`` ago; how many."""
    s3 = aws.client("s3", aws_settings)
    now = time.time()
    count = 0
    for prefix in RUN_PREFIXES:
        try:
            pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=names.bucket, Prefix=prefix))
        except ClientError as exc:
            if _absent(exc, "NoSuchBucket"):
                return count
            raise
        keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])
                if now - o["LastModified"].timestamp() >= older_than_s]
        for start in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=names.bucket, Delete={"Objects": keys[start:start + 1000], "Quiet": True})
        count += len(keys)
    return count


#: Runs last at most a day (an event's run_timeout is capped at 86,400 s): older run resources
#: belong to a coordinator that died, and the next run's coordinator removes them.
STALE_RUN_SECONDS = 86400.0


def sweep_stale_queues(names: Names, aws_settings: aws.AwsSettings) -> list[str]:
    """What every run's coordinator does first: remove run queues older than any run can be
    (one ListQueues when there are none; run objects expire by the bucket's lifecycle rule)."""
    return _delete_run_queues(names, aws_settings, STALE_RUN_SECONDS)


def cleanup(settings: DeploySettings, aws_settings: aws.AwsSettings | None = None,
            older_than_s: float = 0.0) -> list[str]:
    """``fsd-inference cleanup``: remove what runs left behind (a coordinator that was killed):
    run queues with their subscriptions, and run objects, at least ``older_than_s`` old. The
    deployment itself stays. Lambda workers of such a run fail at their next receive once their
    queue is gone (object channel: within their receive timeout)."""
    aws_settings = aws_settings or aws.AwsSettings()
    n = names_for(settings, aws_settings)
    removed = [f"leftover run queue {q}" for q in _delete_run_queues(n, aws_settings, older_than_s)]
    objects = _delete_run_objects(n, aws_settings, older_than_s)
    if objects:
        removed.append(f"{objects} leftover run objects in bucket {n.bucket}")
    return removed


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _delete_if_there(call: Callable[[], Any], *codes: str) -> bool:
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
