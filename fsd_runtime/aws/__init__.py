"""The AWS adapters: boto3 clients and retries (``clients``), the Lambda handler, invokers, the S3
run store, deploy/teardown/cleanup and the SAM template, the CLI's AWS side (``run``), the
coordinator mode and the cost model.

Importing this package imports nothing (it holds only the kind names below): the handler loads without boto3, and the core runtime
(model, partition, plan, worker, coordinator, channels' contract and local channel, launch,
storage, metrics) never imports from here.
"""

#: The names the CLI's parser offers (here, so that it needs no boto3 to build them).
AWS_CHANNELS = ("queue", "object")
INVOKERS = ("local", "lambda", "rie")
ARCHITECTURES = ("x86_64", "arm64")
