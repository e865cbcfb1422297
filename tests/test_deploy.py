"""deploy / teardown against the local AWS-API server, and the SAM template through cfn-lint."""
from __future__ import annotations

import functools
import json
import os
import re
import uuid

import pytest

from fsd_runtime.aws import deploy, template
from fsd_runtime.aws import clients as aws

client = functools.lru_cache(maxsize=None)(aws.client)  # a boto3 client costs ~0.3 s to make
from fsd_runtime.channels.queue import QueueResources

LAYER = b"PK\x05\x06" + bytes(18)  # an empty zip: moto stores layers without unpacking them


def _settings(**kw) -> deploy.DeploySettings:
    return deploy.DeploySettings(name=f"fsd-{uuid.uuid4().hex[:8]}", topics=2, **kw)


def _inventory(names: deploy.Names, settings) -> dict:
    """What exists of a deployment, read back through the public APIs."""
    lam, iam, s3, sns, sqs = (client(s, settings) for s in ("lambda", "iam", "s3", "sns", "sqs"))
    prefix = names.settings.name + deploy.SEP
    topics = sorted(t["TopicArn"].rsplit(":", 1)[1] for t in sns.list_topics()["Topics"]
                    if t["TopicArn"].rsplit(":", 1)[1].startswith(prefix))
    try:
        layers = lam.list_layer_versions(LayerName=names.layer)["LayerVersions"]
    except lam.exceptions.ResourceNotFoundException:
        layers = []
    return {
        "topics": topics,
        "functions": [f for f in lam.list_functions()["Functions"] if f["FunctionName"] == names.function],
        "layers": layers,
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"] == names.role],
        "buckets": [b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"] == names.bucket],
        "queues": sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", []),
    }


EMPTY = {"topics": [], "functions": [], "layers": [], "roles": [], "buckets": [], "queues": []}


def test_deploy_creates_everything_once_and_teardown_removes_it(aws_settings):
    settings = _settings()
    names = deploy.names_for(settings, aws_settings)

    changes = deploy.deploy(settings, aws_settings, LAYER)
    assert f"created function {names.function}" in changes
    have = _inventory(names, aws_settings)
    assert have["topics"] == [f"{settings.name}_t0", f"{settings.name}_t1"]
    assert have["buckets"] == [names.bucket] and have["roles"] == [names.role]
    rules = client("s3", aws_settings).get_bucket_lifecycle_configuration(Bucket=names.bucket)["Rules"]
    assert sorted(r["Filter"]["Prefix"] for r in rules) == ["fsd-runs/", "runs/"]
    assert len(have["layers"]) == 1
    (function,) = have["functions"]
    assert function["Handler"] == "fsd_runtime.aws.handler.handler"
    assert function["Runtime"] == "python3.13" and function["MemorySize"] == 2048
    assert [layer["Arn"] for layer in function["Layers"]] == [have["layers"][0]["LayerVersionArn"]]
    lam, iam = client("lambda", aws_settings), client("iam", aws_settings)
    assert lam.get_function_event_invoke_config(FunctionName=names.function)["MaximumRetryAttempts"] == 0
    policy = iam.get_role_policy(RoleName=names.role, PolicyName=names.policy)["PolicyDocument"]
    assert (json.loads(policy) if isinstance(policy, str) else policy) == deploy.least_privilege_policy(names)

    assert lam.get_function_concurrency(FunctionName=names.function)["ReservedConcurrentExecutions"] == 100
    env = function["Environment"]["Variables"]
    assert env[deploy.ENV_DEPLOYMENT] == settings.name and env[deploy.ENV_BUCKET] == names.bucket
    assert (env[deploy.ENV_MAX_WORKERS], env[deploy.ENV_MAX_FANOUT]) == ("64", "16")

    assert deploy.deploy(settings, aws_settings, LAYER) == []
    assert _inventory(names, aws_settings) == have
    assert deploy.deploy(deploy.DeploySettings(name=settings.name, topics=2, reserved_concurrency=0),
                         aws_settings, LAYER) == [f"removed reserved concurrency of function {names.function}"]

    removed = deploy.teardown(settings, aws_settings)
    assert f"function {names.function}" in removed and f"bucket {names.bucket}" in removed
    assert _inventory(names, aws_settings) == EMPTY
    assert deploy.teardown(settings, aws_settings) == []


def test_bucket_refuses_plain_http(aws_settings):
    """The local server enforces bucket policies; it speaks only plain http, so with the TLS-only
    policy every request is refused (on AWS, TLS requests pass). Auto mode leaves it off there."""
    settings = _settings(lambda_function=False, tls_only=True)
    names = deploy.names_for(settings, aws_settings)
    try:
        changes = deploy.deploy(settings, aws_settings)
        assert f"set TLS-only policy of bucket {names.bucket}" in changes
        s3 = client("s3", aws_settings)
        assert json.loads(s3.get_bucket_policy(Bucket=names.bucket)["Policy"]) == deploy.bucket_policy(names)
        (tls,) = deploy.bucket_policy(names)["Statement"]
        assert tls["Effect"] == "Deny" and tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        with pytest.raises(s3.exceptions.ClientError, match="Forbidden|AccessDenied"):
            s3.put_object(Bucket=names.bucket, Key="runs/x/y", Body=b"1")
        auto = deploy.DeploySettings(name=settings.name, topics=2, lambda_function=False)
        assert deploy.deploy(auto, aws_settings) == [
            f"removed the TLS-only policy of bucket {names.bucket} (plain-http endpoint)"]
        s3.put_object(Bucket=names.bucket, Key="runs/x/y", Body=b"1")
    finally:
        deploy.teardown(settings, aws_settings)


def test_redeploy_changes_only_what_differs(aws_settings):
    settings = _settings()
    deploy.deploy(settings, aws_settings, LAYER)
    try:
        bigger = deploy.DeploySettings(name=settings.name, topics=3, memory_mb=3008)
        changes = deploy.deploy(bigger, aws_settings, LAYER)
        assert sorted(changes) == sorted([  # the policy names the topics, so it follows them
            f"created topic {settings.name}_t2",
            f"set policy {settings.name}_least-privilege on role {settings.name}_worker",
            f"updated configuration of function {settings.name}"])
        new_layer = LAYER[:-1] + b"\x01"
        assert deploy.deploy(bigger, aws_settings, new_layer) == [
            f"published layer {deploy.names_for(bigger, aws_settings).layer} version 2",
            f"updated configuration of function {settings.name}"]
    finally:
        deploy.teardown(deploy.DeploySettings(name=settings.name, topics=3), aws_settings)


def test_storage_only_deployment_and_leftover_run_queues_are_swept(aws_settings):
    settings = _settings(lambda_function=False)
    names = deploy.names_for(settings, aws_settings)
    assert sorted(deploy.deploy(settings, aws_settings)) == sorted(
        [f"created bucket {names.bucket}", f"set expiry of run objects in bucket {names.bucket}",
         f"created topic {settings.name}_t0", f"created topic {settings.name}_t1"])
    resources = QueueResources(deploy.queue_config(names, aws_settings))
    resources.create_run("crashed", 2)  # a coordinator that died before delete_run
    other = _settings()  # another deployment's run queue must survive our teardown
    other_names = deploy.names_for(other, aws_settings)
    QueueResources(deploy.queue_config(other_names, aws_settings)).create_run("alive", 1)
    try:
        removed = deploy.teardown(settings, aws_settings)
        assert {f"leftover run queue {settings.name}_crashed_{w}" for w in (0, 1)} <= set(removed)
        assert _inventory(names, aws_settings) == EMPTY
        assert len(_inventory(other_names, aws_settings)["queues"]) == 1
    finally:
        deploy.teardown(other, aws_settings)


def test_teardown_and_cleanup_find_every_topic_a_deploy_made(aws_settings):
    """Deployed with 4 topics, torn down (and cleaned up) with the default settings' 2: every
    topic, run queue and subscription goes (teardown once kept t2, t3 and the run's queues,
    whose policies name all 4 topics)."""
    wide = deploy.DeploySettings(name=f"fsd-{uuid.uuid4().hex[:8]}", topics=4, lambda_function=False)
    names = deploy.names_for(wide, aws_settings)
    deploy.deploy(wide, aws_settings)
    QueueResources(deploy.queue_config(names, aws_settings)).create_run("crashed", 2)
    narrow = deploy.DeploySettings(name=wide.name, topics=2, lambda_function=False)
    try:
        cleaned = deploy.cleanup(narrow, aws_settings, older_than_s=0)
        assert {f"leftover run queue {wide.name}_crashed_{w}" for w in (0, 1)} <= set(cleaned)
        removed = deploy.teardown(narrow, aws_settings)
        assert {f"topic {wide.name}_t{i}" for i in range(4)} <= set(removed)
        assert _inventory(names, aws_settings) == EMPTY
        assert not [s for s in aws.client("sns", aws_settings).list_subscriptions()["Subscriptions"]
                    if s["TopicArn"].rsplit(":", 1)[1].startswith(f"{wide.name}_")]
    finally:
        deploy.teardown(wide, aws_settings)


@pytest.mark.parametrize("bad", [
    {"name": "Has_Upper"}, {"name": "x"}, {"architecture": "sparc"}, {"python": "3"},
    {"memory_mb": 64}, {"timeout_s": 901}, {"topics": 0},
])
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(deploy.DeployError):
        deploy.DeploySettings(**bad)


def test_missing_layer_zip_names_the_build_command(tmp_path):
    settings = deploy.DeploySettings(layer_zip=str(tmp_path / "nope.zip"))
    with pytest.raises(deploy.DeployError, match="layer.zip.sh"):
        deploy.find_layer_zip(settings)


def iam_match(pattern: str, value: str) -> bool:
    """IAM's resource matching: ``*`` any run of characters (also ``/`` and ``:``), ``?`` one
    character, everything else literal and case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def test_iam_match_follows_iam_rules():
    assert iam_match("arn:aws:sqs:r:1:fsd_*", "arn:aws:sqs:r:1:fsd_run_0")
    assert iam_match("a?c", "abc") and not iam_match("a?c", "ac")
    assert iam_match("x*", "x/y:z") and not iam_match("X*", "x")
    assert iam_match("arn:aws:sqs:r:1:fsd-*", "arn:aws:sqs:r:1:fsd-inference-run-0")  # the old hole


def _resource_arns(names: deploy.Names, runs=("0123456789abcdef", "run", "a-b", "x_y")) -> list[str]:
    """Every resource ARN a deployment has or makes, including run-scoped ones of several runs."""
    from fsd_runtime.channels.queue import queue_name

    p = names.partition
    bucket = f"arn:{p}:s3:::{names.bucket}"
    arns = [bucket, f"{bucket}/x", names.function_arn(), *names.topic_arns(),
            names.arn("lambda", f"layer:{names.layer}:1"), f"arn:{p}:iam::{names.account}:role/{names.role}",
            names.arn("logs", f"log-group:/aws/lambda/{names.function}"),
            names.arn("logs", f"log-group:/aws/lambda/{names.function}:log-stream:2026/12/07/[$LATEST]ab")]
    for run in runs:
        arns += [names.arn("sqs", queue_name(names.settings.name, run, w)) for w in (0, 1, 12)]
        arns += [f"{bucket}/runs/{run}/shares/0.npz", f"{bucket}/fsd-runs/{run}/s00000001/w00000/p000"]
    return arns


#: Deployment names sharing prefixes with each other (the isolation hole was ``fsd`` vs ``fsd-...``).
PREFIX_SHARING = ["fsd", "fsd-inference", "fsd-a", "fsd-a-b", "fsdx", "fsd-t0", "fsd-worker", "fsd-1"]


@pytest.mark.parametrize("coordinator_mode", [False, True])
def test_policy_patterns_match_only_their_own_deployment(coordinator_mode):
    region, account = "eu-west-1", "123456789012"
    all_names = {n: deploy.Names(deploy.DeploySettings(name=n, topics=12, coordinator_mode=coordinator_mode),
                                 account, region) for n in PREFIX_SHARING}
    arns = {n: _resource_arns(names) for n, names in all_names.items()}
    for name, names in all_names.items():
        patterns = [(st["Sid"], r) for st in deploy.least_privilege_policy(names)["Statement"]
                    for r in st["Resource"] if r != "*"]
        assert any(iam_match(r, a) for _, r in patterns for a in arns[name])  # the matcher does match
        for other, other_arns in arns.items():
            if other == name:
                continue
            leaks = [(sid, r, a) for sid, r in patterns for a in other_arns if iam_match(r, a)]
            assert leaks == [], f"{name}'s policy reaches {other}: {leaks[:3]}"
    # and within the deployment: run objects only under the run prefixes, queues only run queues
    names = all_names["fsd"]
    for st in deploy.least_privilege_policy(names)["Statement"]:
        for r in st["Resource"]:
            if r.startswith("arn:aws:s3:::") and "/" in r:
                assert r.endswith(("/runs/*", "/fsd-runs/*")), r


def test_worker_rights_never_overwrite_or_delete():
    names = deploy.Names(deploy.DeploySettings(name="fsd-a", topics=2), "123456789012", "eu-west-1")
    policy = deploy.least_privilege_policy(names)
    assert all(st["Effect"] == "Allow" and "*" not in st["Action"] for st in policy["Statement"])
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert not {a for a in actions if a.startswith(("iam:", "sqs:Create", "sns:Create", "s3:Create"))}
    assert not {a for a in actions if "Delete" in a}
    (put,) = [st for st in policy["Statement"] if "s3:PutObject" in st["Action"]]
    assert put["Condition"] == {"StringEquals": {"s3:if-none-match": "*"}}  # create-only
    (listing,) = [st for st in policy["Statement"] if "s3:ListBucket" in st["Action"]]
    assert listing["Condition"]["StringLike"]["s3:prefix"] == ["runs/*", "fsd-runs/*"]


@pytest.mark.parametrize("bad", ["fsd_a", "FSD", "fsd.a", "a", "fsd-", "-fsd", "x" * 25])
def test_deployment_names_cannot_hold_the_separator_or_odd_characters(bad):
    with pytest.raises(deploy.DeployError):
        deploy.DeploySettings(name=bad)


def test_limits_and_reserved_concurrency_are_checked():
    with pytest.raises(deploy.DeployError, match="reserved_concurrency"):
        deploy.DeploySettings(max_workers=64, reserved_concurrency=10)
    with pytest.raises(deploy.DeployError, match="max_fanout"):
        deploy.DeploySettings(max_fanout=1000)
    assert deploy.DeploySettings(max_workers=200, reserved_concurrency=0).reserved_concurrency == 0


def test_coordinator_mode_adds_only_run_management_rights(aws_settings):
    names = deploy.Names(deploy.DeploySettings(name="fsd-c", coordinator_mode=True), "123456789012", "eu-west-1")
    worker_only = deploy.Names(deploy.DeploySettings(name="fsd-c"), "123456789012", "eu-west-1")
    policy = deploy.least_privilege_policy(names)
    added = policy["Statement"][len(deploy.least_privilege_policy(worker_only)["Statement"]):]
    assert [st["Sid"] for st in added] == ["RunQueueLifecycle", "RunSubscriptions", "FindTopics", "RunUploadAndCleanup"]
    assert [st["Resource"] for st in added if "*" in st["Resource"]] == [["*"]]  # ListTopics only
    client("iam", aws_settings).create_policy(PolicyName=f"fsd-{uuid.uuid4().hex[:8]}",
                                              PolicyDocument=json.dumps(policy))  # valid IAM syntax


def test_sam_template_passes_cfn_lint_and_matches_deploy(monkeypatch):
    from cfnlint.api import ManualArgs, lint

    for key in ("AWS_DEFAULT_REGION", "AWS_REGION"):  # cfn-lint's SAM translator sets the region
        monkeypatch.setenv(key, os.environ.get(key, "us-east-1"))  # in os.environ: undo it after

    settings = deploy.DeploySettings(name="fsd-t", architecture="arm64", topics=3)
    text = template.render(settings)
    assert [str(m) for m in lint(text, config=ManualArgs(regions=["eu-west-1"]))] == []
    doc = json.loads(text)
    resources = doc["Resources"]
    assert sorted(k for k in resources if k.startswith("Topic")) == ["Topic0", "Topic1", "Topic2"]
    function = resources["WorkerFunction"]["Properties"]
    assert function["Architectures"] == ["arm64"] and function["Handler"] == deploy.HANDLER
    assert function["ReservedConcurrentExecutions"] == settings.reserved_concurrency
    assert function["Environment"]["Variables"][deploy.ENV_MAX_WORKERS] == "64"
    assert resources["BucketPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]["Sid"] == "TlsOnly"
    assert function["EventInvokeConfig"] == {"MaximumRetryAttempts": 0}
    statements = resources["WorkerRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    names = deploy.Names(settings, "${AWS::AccountId}", "${AWS::Region}", "${AWS::Partition}")
    assert [st["Sid"] for st in statements] == [st["Sid"] for st in deploy.least_privilege_policy(names)["Statement"]]
    # The linter really looks: a reference to nothing is invalid CloudFormation in every cfn-lint
    # release (what a release flags beyond that, e.g. an unknown runtime, changes between them).
    broken = json.loads(text)
    broken["Resources"]["WorkerFunction"]["Properties"]["MemorySize"] = {"Ref": "NoSuchParameter"}
    found = [str(m) for m in lint(json.dumps(broken), config=ManualArgs(regions=["eu-west-1"]))]
    assert any("NoSuchParameter" in m for m in found), found


def test_cli_deploy_teardown_and_template(aws_settings, capsys):
    from fsd_runtime import cli

    name = f"fsd-{uuid.uuid4().hex[:8]}"
    where = ["--deployment", name, "--endpoint-url", aws_settings.endpoint_url, "--region", "us-east-1",
             "--topics", "1"]
    assert cli.main(["deploy", "--no-lambda", *where]) == 0
    assert f"created topic {name}_t0" in capsys.readouterr().out
    assert cli.main(["deploy", "--no-lambda", *where]) == 0
    assert capsys.readouterr().out == "up to date: nothing changed\n"
    assert cli.main(["deploy", *where, "--layer-zip", "/nonexistent/layer.zip"]) == 2
    assert "layer.zip.sh" in capsys.readouterr().err
    names = deploy.names_for(deploy.DeploySettings(name=name), aws_settings)
    assert [r for r in client("iam", aws_settings).list_roles()["Roles"] if r["RoleName"] == names.role] == []
    assert cli.main(["teardown", *where]) == 0
    assert f"deleted topic {name}_t0" in capsys.readouterr().out
    assert cli.main(["teardown", *where]) == 0
    assert capsys.readouterr().out == "nothing to delete\n"
    assert cli.main(["deploy", "--template-only", "--deployment", name, "--architecture", "arm64"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["Resources"]["WorkerFunction"]["Properties"]["FunctionName"] == name
