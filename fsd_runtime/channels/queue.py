"""SNS+SQS channel (FSD-Inf-Queue): workers publish to SNS topics, each worker long-polls its own SQS queue.

Layout of one run (``create_run``): the deployment's topics (``{prefix}_t{i}``,
created if missing) and, for this run only, one standard queue per worker
(``{prefix}_{run}_{worker}``; the prefix cannot contain ``_``, so no prefix's names
match another's ``{prefix}_*``), each subscribed to every topic with raw message
delivery and the filter policy ``{"run": [run], "target": ["{worker}"]}``.
Topics are shared by concurrent runs; the filter keeps runs apart, and a
worker spreads its publishes over the topics by ``(worker + step) % topics``.
New subscriptions and filter policies are eventually consistent on AWS, so
``create_run`` returns only once a probe went through every (topic, queue)
path, and ``receive`` also checks the ``run``/``target`` attributes itself,
skipping (and counting) anything a settling filter lets through.

Every request counts, because AWS bills each call per started 64 KiB:

* ``send`` encodes a chunk once however many targets it has: the message's
  ``target`` attribute is a String.Array and SNS delivers ONE publish to every
  queue whose filter matches; entries are packed first-fit-decreasing into
  ``PublishBatch`` calls of <= 10 entries and <= the topic's MaximumMessageSize
  (256 KiB by default, up to 1 MiB when the topics are configured so);
* ``receive`` long-polls (WaitTimeSeconds up to 20, 10 messages a call), so it
  returns as soon as anything arrives and makes no empty polls while waiting;
* deletes are off by default: the queue's visibility timeout (12 h, the
  maximum) outlives any Lambda run, so a received message is never delivered
  again within the run, and the run's queues are deleted at its end. With
  ``delete_messages`` on (for long-lived queues), every receive is followed by
  one ``DeleteMessageBatch``.

Throttling and 5xx are retried with backoff and jitter (fsd_runtime.aws.clients); a
PublishBatch entry reported as failed is published again with its payload;
what cannot be delivered raises ChannelError. SQS may still deliver a
message twice or out of order: the worker loop drops duplicates by header.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from fsd_kernels import codec
from fsd_runtime.aws.clients import AwsSettings, Caller, adapter_fields, billed_chunks, client
from fsd_runtime.channels.base import Channel, ChannelError

#: SNS/SQS limits this channel packs against.
DEFAULT_MESSAGE_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH_ENTRIES = 10
MAX_WAIT_SECONDS = 20
#: Longest SQS visibility timeout: a received message stays hidden for the rest of the run.
VISIBILITY_SECONDS = 43200
DEFAULT_TOPICS = 4
#: Bodies starting with this are set-up probes, never chunks (base85 has no '.').
PROBE_PREFIX = ".probe "
#: How long create_run waits for new subscriptions to deliver (AWS: up to 15 minutes).
SUBSCRIPTION_WAIT_SECONDS = 900
#: Queue-channel prefixes (deployment names): no '_', the separator of every derived name.
_NAME = re.compile(r"^[A-Za-z0-9-]{1,40}$")
#: SQS's longest queue name.
MAX_QUEUE_NAME = 80


@dataclass(frozen=True)
class QueueConfig:
    """The queue channel's settings; ``topic_arns``/``queue_urls`` are filled in by ``create_run``."""

    prefix: str = "fsd"
    topics: int = DEFAULT_TOPICS
    max_message_bytes: int = DEFAULT_MESSAGE_BYTES
    delete_messages: bool = False
    aws: AwsSettings = AwsSettings()
    topic_arns: tuple[str, ...] = ()
    queue_urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, config: Mapping) -> "QueueConfig":
        """Validate a channel config dict (``{"kind": "queue", ...}``); ValueError names the field."""
        fields = adapter_fields(config, cls.__dataclass_fields__, "queue channel")
        parsed = cls(**{**fields, "topic_arns": tuple(fields.get("topic_arns", ())),
                        "queue_urls": tuple(fields.get("queue_urls", ()))})
        if not isinstance(parsed.prefix, str) or not _NAME.match(parsed.prefix):
            raise ValueError(f"queue channel 'prefix' must match {_NAME.pattern}, got {parsed.prefix!r}")
        if not isinstance(parsed.topics, int) or not 1 <= parsed.topics <= 100:
            raise ValueError(f"queue channel 'topics' must be 1..100, got {parsed.topics!r}")
        if not isinstance(parsed.max_message_bytes, int) or not 1024 <= parsed.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"queue channel 'max_message_bytes' must be 1024..{MAX_MESSAGE_BYTES}, "
                             f"got {parsed.max_message_bytes!r}")
        if not isinstance(parsed.delete_messages, bool):
            raise ValueError("queue channel 'delete_messages' must be true or false")
        return parsed

    def to_dict(self) -> dict:
        return {"kind": "queue", "prefix": self.prefix, "topics": self.topics,
                "max_message_bytes": self.max_message_bytes, "delete_messages": self.delete_messages,
                "aws": self.aws.to_dict(), "topic_arns": list(self.topic_arns),
                "queue_urls": list(self.queue_urls)}


def topic_name(prefix: str, index: int) -> str:
    return f"{prefix}_t{index}"


def queue_name(prefix: str, run_id: str, worker: int) -> str:
    name = f"{prefix}_{run_id}_{worker}"
    if len(name) > MAX_QUEUE_NAME:
        raise ChannelError(f"queue name {name!r} is longer than SQS's {MAX_QUEUE_NAME} characters: "
                           "use a shorter deployment name or run id")
    return name


def _attribute_bytes(name: str, data_type: str, value: str) -> int:
    """What a message attribute adds to the billed/limited message size."""
    return len(name) + len(data_type) + len(value.encode())


def _message_attributes(run_id: str, targets: Sequence[int]) -> dict:
    """What the subscriptions' filter policies match on: the run and the targets (a String.Array)."""
    return {"run": {"DataType": "String", "StringValue": run_id},
            "target": {"DataType": "String.Array", "StringValue": _targets_text(targets)}}


def _targets_text(targets: Sequence[int]) -> str:
    return json.dumps([str(t) for t in targets], separators=(",", ":"))


def _received_bytes(message: dict) -> int:
    """A received message's billed size: body plus the attributes asked for."""
    return len(message["Body"].encode()) + sum(
        _attribute_bytes(name, a.get("DataType", ""), a.get("StringValue", ""))
        for name, a in message.get("MessageAttributes", {}).items())


def _queue_policy(queue_arn: str, topic_arns: Sequence[str]) -> str:
    """Only this deployment's topics may send to the queue."""
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "fsd-topics", "Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage", "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": list(topic_arns)}}}]})


class QueueResources:
    """Idempotent set-up and tear-down of topics, run queues and subscriptions (coordinator, deploy)."""

    def __init__(self, config: QueueConfig, caller: Caller | None = None):
        self.config = config
        self.call = caller or Caller(config.aws)
        self.sns = client("sns", config.aws)
        self.sqs = client("sqs", config.aws)

    def ensure_topics(self) -> list[str]:
        """The deployment's topics (CreateTopic returns the existing one when it exists)."""
        attributes = ({} if self.config.max_message_bytes == DEFAULT_MESSAGE_BYTES
                      else {"MaximumMessageSize": str(self.config.max_message_bytes)})
        return [self.call("CreateTopic", self.sns.create_topic, Name=topic_name(self.config.prefix, i),
                          Attributes=attributes)["TopicArn"] for i in range(self.config.topics)]

    def existing_topics(self) -> list[str]:
        """ARNs of every topic of this prefix that exists (``PREFIX_t0``, ``PREFIX_t1``, ...,
        however many a deploy made, not only ``config.topics``; ListTopics, nothing created)."""
        ours = re.compile(re.escape(topic_name(self.config.prefix, 0)[:-1]) + r"(0|[1-9][0-9]*)")
        found, token = [], None
        while True:
            answer = self.call("ListTopics", self.sns.list_topics, **({"NextToken": token} if token else {}))
            found.extend(t["TopicArn"] for t in answer.get("Topics", [])
                         if ours.fullmatch(t["TopicArn"].rsplit(":", 1)[-1]))
            token = answer.get("NextToken")
            if not token:
                return sorted(found)

    def delete_topics(self) -> None:
        """Remove the deployment's topics (teardown); their subscriptions go with them."""
        for arn in self.existing_topics():
            self.call("DeleteTopic", self.sns.delete_topic, TopicArn=arn)

    def create_run(self, run_id: str, n_workers: int, *, probe_timeout: float = SUBSCRIPTION_WAIT_SECONDS,
                   probe_resend: float = MAX_WAIT_SECONDS) -> QueueConfig:
        """Topics (if missing), then one queue per worker subscribed to every topic; returns once
        every subscription delivers (see :meth:`await_subscriptions`)."""
        topic_arns = self.config.topic_arns or tuple(self.ensure_topics())
        queue_urls = []
        try:
            for worker in range(n_workers):
                url = self.call("CreateQueue", self.sqs.create_queue,
                                QueueName=queue_name(self.config.prefix, run_id, worker),
                                Attributes={"VisibilityTimeout": str(VISIBILITY_SECONDS),
                                            "MaximumMessageSize": str(self.config.max_message_bytes),
                                            "MessageRetentionPeriod": "86400"})["QueueUrl"]
                arn = self._queue_arn(url)
                self.call("SetQueueAttributes", self.sqs.set_queue_attributes, QueueUrl=url,
                          Attributes={"Policy": _queue_policy(arn, topic_arns)})
                policy = json.dumps({"run": [run_id], "target": [str(worker)]})
                for topic in topic_arns:
                    self.call("Subscribe", self.sns.subscribe, TopicArn=topic, Protocol="sqs", Endpoint=arn,
                              Attributes={"RawMessageDelivery": "true", "FilterPolicy": policy},
                              ReturnSubscriptionArn=True)
                queue_urls.append(url)
            self.await_subscriptions(run_id, topic_arns, queue_urls, probe_timeout, probe_resend)
        except BaseException:  # failed or interrupted part-way: the caller has no config to delete
            try:
                self.delete_run(run_id, n_workers)
            except Exception:  # noqa: BLE001 (the first error is the one to report)
                pass
            raise
        return QueueConfig(**{**self.config.__dict__, "topic_arns": tuple(topic_arns),
                              "queue_urls": tuple(queue_urls)})

    def await_subscriptions(self, run_id: str, topic_arns: Sequence[str], queue_urls: Sequence[str],
                            timeout: float = SUBSCRIPTION_WAIT_SECONDS,
                            resend_every: float = MAX_WAIT_SECONDS) -> None:
        """Publish a probe through every (topic, queue) subscription and wait until each arrived.

        New SNS subscriptions and filter policies are eventually consistent ("up to 15
        minutes"): a run must not start before every path delivers. Probes go out again every
        ``resend_every`` seconds until all are seen; the probes are consumed here (a late duplicate is skipped by
        the channel's receive)."""
        missing = {(t, w) for t in range(len(topic_arns)) for w in range(len(queue_urls))}
        deadline = time.monotonic() + timeout
        while missing:
            for t, topic in enumerate(topic_arns):
                workers = sorted(w for tt, w in missing if tt == t)
                for start in range(0, len(workers), MAX_BATCH_ENTRIES):
                    entries = [{"Id": str(w), "Message": f"{PROBE_PREFIX}{t}",
                                "MessageAttributes": _message_attributes(run_id, [w])}
                               for w in workers[start:start + MAX_BATCH_ENTRIES]]
                    self.call("PublishBatch", self.sns.publish_batch, TopicArn=topic,
                              PublishBatchRequestEntries=entries)
            round_end = min(deadline, time.monotonic() + resend_every)
            for w, url in enumerate(queue_urls):
                while any(ww == w for _, ww in missing) and time.monotonic() < round_end:
                    answer = self.call("ReceiveMessage", self.sqs.receive_message, QueueUrl=url,
                                       MaxNumberOfMessages=MAX_BATCH_ENTRIES, WaitTimeSeconds=1)
                    for message in answer.get("Messages", []):
                        body = message["Body"]
                        if body.startswith(PROBE_PREFIX) and body[len(PROBE_PREFIX):].isdigit():
                            missing.discard((int(body[len(PROBE_PREFIX):]), w))
            if missing and time.monotonic() >= deadline:
                raise ChannelError(f"run {run_id}: {len(missing)} SNS->SQS subscriptions still not "
                                   f"delivering after {timeout:.0f} s, e.g. topic/worker {sorted(missing)[0]}")

    def _queue_arn(self, url: str) -> str:
        answer = self.call("GetQueueAttributes", self.sqs.get_queue_attributes, QueueUrl=url,
                           AttributeNames=["QueueArn"])
        return answer["Attributes"]["QueueArn"]

    def delete_run(self, run_id: str, n_workers: int) -> None:
        """Unsubscribe and delete the run's queues; what is already gone is skipped."""
        gone = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NotFound"})
        arns = {}
        for worker in range(n_workers):
            answer = self.call("GetQueueUrl", self.sqs.get_queue_url, absent=gone,
                               QueueName=queue_name(self.config.prefix, run_id, worker))
            if answer is not None:
                arns[self._queue_arn(answer["QueueUrl"])] = answer["QueueUrl"]
        topic_arns = self.config.topic_arns or self.existing_topics()
        for topic in topic_arns:
            for subscription in self._subscriptions(topic, gone):
                if subscription["Endpoint"] in arns:
                    self.call("Unsubscribe", self.sns.unsubscribe, absent=gone,
                              SubscriptionArn=subscription["SubscriptionArn"])
        for url in arns.values():
            self.call("DeleteQueue", self.sqs.delete_queue, absent=gone, QueueUrl=url)

    def _subscriptions(self, topic: str, gone: frozenset[str]) -> list[dict]:
        found, token = [], None
        while True:
            kwargs = {"TopicArn": topic, **({"NextToken": token} if token else {})}
            answer = self.call("ListSubscriptionsByTopic", self.sns.list_subscriptions_by_topic,
                               absent=gone, **kwargs)
            if answer is None:
                return found
            found.extend(answer.get("Subscriptions", []))
            token = answer.get("NextToken")
            if not token:
                return found


@dataclass
class _Entry:
    text: str
    targets: list[int]
    size: int


def pack_batches(sizes: Sequence[int], limit: int, max_entries: int = MAX_BATCH_ENTRIES) -> list[list[int]]:
    """Indices grouped first-fit-decreasing into batches of <= ``max_entries`` and <= ``limit`` bytes."""
    batches: list[list[int]] = []
    totals: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] > limit:
            raise ChannelError(f"a message of {sizes[i]} bytes exceeds the {limit}-byte limit")
        for b, batch in enumerate(batches):
            if len(batch) < max_entries and totals[b] + sizes[i] <= limit:
                batch.append(i)
                totals[b] += sizes[i]
                break
        else:
            batches.append([i])
            totals.append(sizes[i])
    return batches


class QueueChannel(Channel):
    """One worker's end: publishes to the run's topics, long-polls its own queue."""

    def __init__(self, config: QueueConfig, worker_id: int, n_workers: int, run_id: str,
                 caller: Caller | None = None):
        if len(config.queue_urls) != n_workers or not config.topic_arns:
            raise ValueError(f"queue channel config lacks the run's resources ({len(config.queue_urls)} "
                             f"queues for {n_workers} workers, {len(config.topic_arns)} topics): "
                             "call QueueChannel.create_run first")
        self.config = config
        self.worker = worker_id
        self.run_id = run_id
        self.call = caller or Caller(config.aws)
        self.sns = client("sns", config.aws)
        self.sqs = client("sqs", config.aws, read_timeout=MAX_WAIT_SECONDS + 40)
        self.queue_url = config.queue_urls[worker_id]
        self.counts: Counter[str] = Counter()
        self._run_attribute = _attribute_bytes("run", "String", run_id)
        self.max_chunk_bytes = codec.max_payload_for_text(config.max_message_bytes - self._run_attribute
                                                   - _attribute_bytes("target", "String.Array",
                                                                      json.dumps([str(n_workers)] * n_workers)))

    @classmethod
    def from_config(cls, config: Mapping, worker_id: int, n_workers: int, run_id: str) -> "QueueChannel":
        return cls(QueueConfig.parse(config), worker_id, n_workers, run_id)

    @classmethod
    def create_run(cls, config: Mapping, run_id: str, n_workers: int) -> dict:
        return QueueResources(QueueConfig.parse(config)).create_run(run_id, n_workers).to_dict()

    @classmethod
    def delete_run(cls, config: Mapping, run_id: str, n_workers: int) -> None:
        QueueResources(QueueConfig.parse(config)).delete_run(run_id, n_workers)

    # -- sending -------------------------------------------------------------------------------

    def _entries(self, chunks: Sequence[tuple[int, bytes]]) -> list[_Entry]:
        """One entry per distinct chunk, carrying all its targets."""
        by_payload: dict[bytes, list[int]] = {}
        for target, chunk in chunks:
            if len(chunk) > self.max_chunk_bytes:
                raise ChannelError(f"chunk of {len(chunk)} bytes exceeds max_chunk_bytes={self.max_chunk_bytes}")
            by_payload.setdefault(bytes(chunk), []).append(int(target))
        entries = []
        for chunk, targets in by_payload.items():
            text = codec.to_text(chunk)
            size = (len(text.encode()) + self._run_attribute
                    + _attribute_bytes("target", "String.Array", _targets_text(sorted(set(targets)))))
            entries.append(_Entry(text, sorted(set(targets)), size))
        return entries

    def _request_entry(self, index: int, entry: _Entry) -> dict:
        return {"Id": str(index), "Message": entry.text,
                "MessageAttributes": _message_attributes(self.run_id, entry.targets)}

    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        entries = self._entries(chunks)
        topic = self.config.topic_arns[(self.worker + step) % len(self.config.topic_arns)]
        pending = list(range(len(entries)))
        for attempt in range(self.call.settings.max_attempts):
            failed: list[int] = []
            for batch in pack_batches([entries[i].size for i in pending], self.config.max_message_bytes):
                failed.extend(self._publish(topic, [pending[j] for j in batch], entries))
            if not failed:
                return
            self.counts["sns_entries_resent"] += len(failed)
            pending = failed
            time.sleep(self.call.backoff(attempt))
        raise ChannelError(f"worker {self.worker}: {len(pending)} messages of step {step} still failing "
                           f"after {self.call.settings.max_attempts} PublishBatch attempts")

    def _publish(self, topic: str, indices: list[int], entries: list[_Entry]) -> list[int]:
        """One PublishBatch; the indices of entries SNS reports as failed (retryable ones)."""
        payload = sum(entries[i].size for i in indices)
        answer = self.call("PublishBatch", self.sns.publish_batch, TopicArn=topic,
                           PublishBatchRequestEntries=[self._request_entry(i, entries[i]) for i in indices])
        self.counts["sns_publish_calls"] += 1
        # every attempt is priced as billed, retried ones too (AWS may not bill a throttled one)
        self.counts["sns_billed_requests"] += billed_chunks(payload) * (1 + self.call.last_retries())
        self.counts["bytes_sent"] += payload
        failed = answer.get("Failed", [])
        for failure in failed:
            if failure.get("SenderFault"):
                raise ChannelError(f"SNS rejected message {failure.get('Id')}: {failure.get('Code')} "
                                   f"{failure.get('Message')}")
        self.counts["messages_sent"] += len(indices) - len(failed)
        return [int(failure["Id"]) for failure in failed]

    # -- receiving -----------------------------------------------------------------------------

    def receive(self, step: int, timeout: float) -> list[bytes]:
        """Long polls (whole seconds, SQS's unit) until a chunk for this worker arrives or
        ``timeout`` is spent; a timeout under half a second makes one short poll."""
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0, min(MAX_WAIT_SECONDS, round(deadline - time.monotonic())))
            answer = self.call("ReceiveMessage", self.sqs.receive_message, QueueUrl=self.queue_url,
                               MaxNumberOfMessages=MAX_BATCH_ENTRIES, WaitTimeSeconds=wait,
                               MessageAttributeNames=["run", "target"])
            messages = answer.get("Messages", [])
            payload = sum(_received_bytes(m) for m in messages)
            self.counts["sqs_receive_calls"] += 1
            self.counts["sqs_billed_requests"] += billed_chunks(payload) + self.call.last_retries()
            self.counts["messages_received"] += len(messages)
            self.counts["bytes_received"] += payload
            if messages and self.config.delete_messages:
                self._delete(messages)
            chunks = [self._chunk(m) for m in messages if self._addressed_here(m)]
            if chunks or deadline - time.monotonic() < 0.5:
                return chunks

    def _addressed_here(self, message: dict) -> bool:
        """Whether a message is a chunk of this run for this worker. Probes, and deliveries a
        filter policy still settling let through, are skipped (and counted), not errors."""
        if message["Body"].startswith(PROBE_PREFIX):
            self.counts["probes_skipped"] += 1
            return False
        attributes = message.get("MessageAttributes", {})
        run = attributes.get("run", {}).get("StringValue")
        try:
            targets = json.loads(attributes.get("target", {}).get("StringValue", "[]"))
        except (ValueError, RecursionError):
            targets = []
        if run != self.run_id or not isinstance(targets, list) or str(self.worker) not in targets:
            self.counts["foreign_skipped"] += 1
            return False
        return True

    def _chunk(self, message: dict) -> bytes:
        try:
            return codec.from_text(message["Body"])
        except ValueError as exc:
            raise ChannelError(f"worker {self.worker}: message {message.get('MessageId')} in "
                               f"{self.queue_url} is not an encoded chunk: {exc}") from None

    def _delete(self, messages: list[dict]) -> None:
        pending = {str(i): m["ReceiptHandle"] for i, m in enumerate(messages)}
        for attempt in range(self.call.settings.max_attempts):
            answer = self.call("DeleteMessageBatch", self.sqs.delete_message_batch, QueueUrl=self.queue_url,
                               Entries=[{"Id": i, "ReceiptHandle": h} for i, h in pending.items()])
            self.counts["sqs_delete_calls"] += 1
            self.counts["sqs_billed_requests"] += 1 + self.call.last_retries()
            pending = {f["Id"]: pending[f["Id"]] for f in answer.get("Failed", [])}
            if not pending:
                return
            time.sleep(self.call.backoff(attempt))
        raise ChannelError(f"worker {self.worker}: {len(pending)} messages could not be deleted from "
                           f"{self.queue_url}")

    def requests(self) -> dict[str, int]:
        """Billed-request and traffic counters (merged into the run's metrics and cost)."""
        return {**self.counts, "aws_retries": sum(self.call.retries.values())}

    def close(self) -> None:
        self.sns.close()
        self.sqs.close()
