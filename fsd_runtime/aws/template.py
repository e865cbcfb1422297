"""The deployment as a SAM (CloudFormation) template, for users who deploy with IaC.

``fsd-inference deploy --template-only > template.yaml`` prints it; the
template is JSON, which is valid YAML, so ``sam deploy`` and CloudFormation
read it as it is. It declares what :mod:`fsd_runtime.aws.deploy` creates by
API calls: bucket (with the TLS-only policy), topics, worker role with the
same least-privilege policy, kernels layer (the zip from ``layer.zip.sh``) and function with
async retries off, reserved concurrency and the deployment's limits. Run queues stay run-scoped (created by the coordinator).
"""
from __future__ import annotations

import json
import os
from typing import Any

from fsd_runtime.aws.deploy import (HANDLER, DeploySettings, Names, bucket_policy, function_environment,
                                least_privilege_policy, lifecycle_rules, trust_policy)


def _placeholder_names(settings: DeploySettings) -> Names:
    """Names whose account, region and partition are CloudFormation pseudo parameters."""
    return Names(settings, "${AWS::AccountId}", "${AWS::Region}", "${AWS::Partition}")


def _sub(value: Any) -> Any:
    """Wrap every string that uses a pseudo parameter in ``Fn::Sub``, recursively."""
    if isinstance(value, str):
        return {"Fn::Sub": value} if "${" in value else value
    if isinstance(value, list):
        return [_sub(v) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v) for k, v in value.items()}
    return value


def sam_template(settings: DeploySettings, layer_zip: str | None = None) -> dict:
    """The template as a dict. ``layer_zip`` is the layer's ContentUri (default: the dist/ zip)."""
    names = _placeholder_names(settings)
    content_uri = layer_zip or settings.layer_zip or os.path.join(
        "dist", f"fsd-inference-layer-{settings.architecture}-py{settings.python}.zip")
    resources: dict[str, Any] = {
        "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {
            "BucketName": _sub(names.bucket),
            "LifecycleConfiguration": {"Rules": [
                {"Id": r["ID"], "Prefix": r["Filter"]["Prefix"], "Status": r["Status"],
                 "ExpirationInDays": r["Expiration"]["Days"]} for r in lifecycle_rules()]},
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True, "IgnorePublicAcls": True,
                "BlockPublicPolicy": True, "RestrictPublicBuckets": True}}},
        "BucketPolicy": {"Type": "AWS::S3::BucketPolicy", "Properties": {
            "Bucket": {"Ref": "Bucket"}, "PolicyDocument": _sub(bucket_policy(names))}},
        "WorkerRole": {"Type": "AWS::IAM::Role", "Properties": {
            "RoleName": names.role,
            "AssumeRolePolicyDocument": trust_policy(),
            "Policies": [{"PolicyName": names.policy,
                          "PolicyDocument": _sub(least_privilege_policy(names))}]}},
        "KernelsLayer": {"Type": "AWS::Serverless::LayerVersion", "Properties": {
            "LayerName": names.layer, "ContentUri": content_uri,
            "CompatibleRuntimes": [f"python{settings.python}"],
            "CompatibleArchitectures": [settings.architecture],
            "RetentionPolicy": "Delete"}},
        "WorkerFunction": {"Type": "AWS::Serverless::Function", "Properties": {
            "FunctionName": names.function, "Handler": HANDLER,
            "Runtime": f"python{settings.python}", "Architectures": [settings.architecture],
            "MemorySize": settings.memory_mb, "Timeout": settings.timeout_s,
            "InlineCode": "# FSD-Inference: the handler and kernels come from the layer\n",
            "Role": {"Fn::GetAtt": ["WorkerRole", "Arn"]},
            "Layers": [{"Ref": "KernelsLayer"}],
            "Environment": {"Variables": _sub(function_environment(settings, names.bucket))},
            **({"ReservedConcurrentExecutions": settings.reserved_concurrency}
               if settings.reserved_concurrency else {}),
            "EventInvokeConfig": {"MaximumRetryAttempts": 0}}},
    }
    for index, topic in enumerate(names.topics):
        resources[f"Topic{index}"] = {"Type": "AWS::SNS::Topic", "Properties": {"TopicName": topic}}
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": f"FSD-Inference deployment {settings.name} ({settings.architecture}, "
                       f"python{settings.python})",
        "Resources": resources,
        "Outputs": {
            "BucketName": {"Value": {"Ref": "Bucket"}},
            "FunctionName": {"Value": {"Ref": "WorkerFunction"}},
            "TopicArns": {"Value": {"Fn::Join": [",", [{"Ref": f"Topic{i}"} for i in range(len(names.topics))]]}},
        },
    }


def render(settings: DeploySettings, layer_zip: str | None = None) -> str:
    """The template as text (JSON, which CloudFormation and SAM accept as YAML too)."""
    return json.dumps(sam_template(settings, layer_zip), indent=2)
