"""S3 channel (FSD-Inf-Object): a worker writes ONE object per step, the others read their part of it.

Keys of a run, all under ``{prefix}/{run}/`` so nothing of another run is ever
listed or read::

    {prefix}/{run}/s{step:08d}/w{source:05d}/p{part:03d}

``part`` counts the ``send`` calls a worker makes for one step (normally one).
S3 bills per request (PUT/LIST ten times a GET), not per byte, so a worker
PUTs all its chunks of a step, for every target, as one object: a small index
(below) then the distinct chunks, each stored once with the list of targets
that need it. A receiver reads the index with a ranged GET of the first
``probe_bytes`` and fetches its own chunks with one more ranged GET when they
lie beyond. Given the worker's hint (``Channel.expect``: the sources whose
chunks it still awaits) it looks for those sources' keys only, and never reads
the objects of peers that have nothing for it. To learn what has arrived it
either GETs each awaited source's next part directly (a missing key is one
cheap GET) or, when that many GETs would cost more than one LIST, LISTs the
step's prefix first (``poll="auto"``, decided at every poll). While it awaits
more than one source, a poll first probes one of them, the *sentinel* (the
highest-numbered source read at its latest poll that read anything, when
awaited; else the highest-numbered awaited), with one GET that is also that object's first read,
and looks for the others only once the sentinel is there: a poll made while
nothing has come costs one GET, not a LIST (``sentinel=False``: every poll
looks for every awaited source).

Polls follow one schedule per step, anchored at the first ``receive`` of the
step (``poll_offset``): poll 0 at once, then intervals doubling from
``poll_interval`` up to ``max_poll_interval`` (not reset when something
arrives), starting at the step's *lead* instead of at 0 once the channel has
learned one. The lead is how long the worker surely waited at its last two
steps before anything arrived (``next_poll_lead``: the smaller of the two
steps' last empty poll before the first one that read something; half the
lead if the poll at the lead already read something; a step read whole at
poll 0 teaches nothing), so a worker whose peers keep arriving 0.48 s after
its first receive polls at 0, ~0.47 and ~0.50 s rather than at 0, 25, 75, 175,
375 and 775 ms (``poll_lead=False``: always the plain schedule). One late step
cannot raise the lead above the other's. ``fsd_runtime.aws.billing`` replays
exactly this.

Object layout (little-endian), validated before anything is used::

    magic b"FSDO" | version u8 = 1 | 3 zero bytes | n_workers u32 | n_chunks u32
    n_chunks x (offset u32, length u32, n_targets u32)      -- chunk table
    sum(n_targets) x target u32                             -- targets, chunk by chunk
    chunk bytes at their offsets (from the object's start)

``delete_run`` removes every key under the run's prefix (the coordinator calls
it at the end, also after a failure).
"""
from __future__ import annotations

import re
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from fsd_runtime.aws.clients import AwsSettings, Caller, adapter_fields, client
from fsd_runtime.channels.base import Channel, ChannelError
from fsd_runtime.aws.cost import PRICES

MAGIC = b"FSDO"
VERSION = 1
_HEAD = struct.Struct("<4sB3xII")
_ENTRY = struct.Struct("<III")
_DELETE_BATCH = 1000
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64})*$")
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class ObjectFormatError(ChannelError, ValueError):
    """An object in the run's prefix is not a well-formed channel object."""


def poll_offset(config: "ObjectConfig", i: int, lead: float = 0.0) -> float:
    """Seconds after a step's first ``receive`` at which the channel makes its poll ``i`` (0-based):
    0, then intervals doubling from ``poll_interval`` to at most ``max_poll_interval``, counted
    from ``lead`` (poll 1 at ``lead`` itself) when there is one."""
    if i == 0:
        return 0.0
    t, interval = 0.0, config.poll_interval
    if lead > 0:
        t, i = lead, i - 1
    for _ in range(i):
        t += interval
        interval = min(2 * interval, config.max_poll_interval)
    return t


def next_poll_lead(config: "ObjectConfig", history: tuple[float, ...], first_read: int | None,
                   lead: float) -> tuple[tuple[float, ...], float]:
    """``(history, lead)`` for the next step, from a step whose first poll that read anything was
    poll ``first_read`` (None: none did) of a schedule with ``lead``: the step's bound on how
    long nothing was there is the offset of the poll before (half the lead if that poll was
    the one at the lead); the next lead is the smaller of the last two steps' bounds (0 until
    there are two). A step read whole at poll 0, or not read, teaches nothing."""
    if not config.poll_lead:
        return (), 0.0
    if first_read:
        bound = lead / 2 if first_read == 1 and lead > 0 else poll_offset(config, first_read - 1, lead)
        history = (history + (bound,))[-2:]
    return history, (min(history) if len(history) == 2 else 0.0)


def use_list(config: "ObjectConfig", n_keys: int) -> bool:
    """Whether a poll for ``n_keys`` awaited keys LISTs the step's prefix (one LIST) rather than
    probing each key with a GET: ``poll="auto"`` takes the cheaper by list price."""
    if config.poll != "auto":
        return config.poll == "list"
    return n_keys * PRICES.s3_get > PRICES.s3_put  # a LIST is billed like a PUT


def sentinel_of(sources: Sequence[int], hint: int | None) -> int:
    """The awaited source a poll probes first (``hint``: the highest-numbered source read at the
    latest poll that read anything, if it is awaited again)."""
    return hint if hint is not None and hint in sources else max(sources)


def pack_object(chunks: Sequence[tuple[int, bytes]], n_workers: int) -> bytes:
    """The object for one ``send``: each distinct chunk once, with the targets that need it."""
    targets_of: dict[bytes, list[int]] = {}
    for target, chunk in chunks:
        if not 0 <= int(target) < n_workers:
            raise ChannelError(f"target {target} is not a worker of 0..{n_workers - 1}")
        targets_of.setdefault(bytes(chunk), []).append(int(target))
    payloads = list(targets_of)
    n_targets = [len(set(targets_of[p])) for p in payloads]
    offset = _HEAD.size + _ENTRY.size * len(payloads) + 4 * sum(n_targets)
    table, target_words = [], []
    for payload, count in zip(payloads, n_targets):
        table.append(_ENTRY.pack(offset, len(payload), count))
        target_words.extend(sorted(set(targets_of[payload])))
        offset += len(payload)
    if offset >= 1 << 32:
        raise ChannelError(f"a step's object of {offset} bytes exceeds the 4 GiB format limit")
    return b"".join([_HEAD.pack(MAGIC, VERSION, n_workers, len(payloads)), *table,
                     struct.pack(f"<{len(target_words)}I", *target_words), *payloads])


@dataclass(frozen=True)
class ObjectIndex:
    """The parsed index of an object: where the chunks for one worker lie."""

    size_needed: int                  # bytes from the start the index itself needs
    ranges: list[tuple[int, int]]     # (offset, length) of the chunks addressed to the reader


def read_index(head: bytes, object_size: int, n_workers: int, reader: int, where: str) -> ObjectIndex:
    """Parse the index at the start of an object (``head`` may be a prefix of it).

    Returns ``size_needed > len(head)`` when the index continues beyond ``head``."""
    if len(head) < _HEAD.size:
        raise ObjectFormatError(f"{where}: {object_size}-byte object is too short for a channel object")
    magic, version, workers, n_chunks = _HEAD.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise ObjectFormatError(f"{where}: not a channel object (magic {magic!r}, version {version})")
    if workers != n_workers:
        raise ObjectFormatError(f"{where}: written for {workers} workers, this run has {n_workers}")
    table_end = _HEAD.size + _ENTRY.size * n_chunks
    if table_end > object_size:
        raise ObjectFormatError(f"{where}: {n_chunks} chunks do not fit in {object_size} bytes")
    if table_end > len(head):
        return ObjectIndex(table_end, [])
    entries = [_ENTRY.unpack_from(head, _HEAD.size + _ENTRY.size * i) for i in range(n_chunks)]
    index_end = table_end + 4 * sum(e[2] for e in entries)
    if index_end > object_size:
        raise ObjectFormatError(f"{where}: target lists overrun the {object_size}-byte object")
    if index_end > len(head):
        return ObjectIndex(index_end, [])
    ranges, pos = [], table_end
    for offset, length, count in entries:
        targets = struct.unpack_from(f"<{count}I", head, pos)
        pos += 4 * count
        if any(t >= n_workers for t in targets) or not index_end <= offset <= offset + length <= object_size:
            raise ObjectFormatError(f"{where}: chunk table entry out of range")
        if reader in targets:
            ranges.append((offset, length))
    return ObjectIndex(index_end, ranges)


@dataclass(frozen=True)
class ObjectConfig:
    """The object channel's settings (the ``{"kind": "object", ...}`` channel config)."""

    bucket: str
    prefix: str = "fsd-runs"
    aws: AwsSettings = AwsSettings()
    #: "auto" (cheaper of GET-probing and LIST), "get" or "list".
    poll: str = "auto"
    poll_interval: float = 0.025
    max_poll_interval: float = 1.0
    probe_bytes: int = 64 * 1024
    max_chunk_bytes: int = 64 * 1024 * 1024
    create_bucket: bool = True
    #: probe one awaited source first, look for the rest once it is there (module notes)
    sentinel: bool = True
    #: start a step's polls after the wait learned at the last two steps (module notes)
    poll_lead: bool = True

    @classmethod
    def parse(cls, config: Mapping) -> "ObjectConfig":
        """Validate a channel config dict; ValueError names the field."""
        fields = adapter_fields(config, cls.__dataclass_fields__, "object channel")
        if "bucket" not in fields:
            raise ValueError("object channel config needs a 'bucket'")
        parsed = cls(**fields)
        if not isinstance(parsed.bucket, str) or not _BUCKET.match(parsed.bucket):
            raise ValueError(f"object channel 'bucket' is not a valid S3 bucket name: {parsed.bucket!r}")
        if not isinstance(parsed.prefix, str) or not _PREFIX.match(parsed.prefix):
            raise ValueError(f"object channel 'prefix' must match {_PREFIX.pattern}, got {parsed.prefix!r}")
        for name in ("sentinel", "poll_lead"):
            if not isinstance(getattr(parsed, name), bool):
                raise ValueError(f"object channel {name!r} must be true or false, got {getattr(parsed, name)!r}")
        if parsed.poll not in ("auto", "get", "list"):
            raise ValueError(f"object channel 'poll' must be auto, get or list, got {parsed.poll!r}")
        for name in ("poll_interval", "max_poll_interval"):
            value = getattr(parsed, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60:
                raise ValueError(f"object channel {name!r} must be seconds in (0, 60], got {value!r}")
        for name, low in (("probe_bytes", _HEAD.size), ("max_chunk_bytes", 1024)):
            value = getattr(parsed, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 1 << 32:
                raise ValueError(f"object channel {name!r} must be an integer in {low}..2**32-1, got {value!r}")
        return parsed

    def to_dict(self) -> dict:
        return {"kind": "object", **{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "aws"},
                "aws": self.aws.to_dict()}

    def run_prefix(self, run_id: str) -> str:
        return f"{self.prefix}/{run_id}/"


def step_prefix(config: ObjectConfig, run_id: str, step: int) -> str:
    return f"{config.run_prefix(run_id)}s{step:08d}/"


def object_key(config: ObjectConfig, run_id: str, step: int, source: int, part: int) -> str:
    return f"{step_prefix(config, run_id, step)}w{source:05d}/p{part:03d}"


def list_keys(call: Caller, s3, bucket: str, prefix: str, counts: Counter | None = None) -> list[str]:
    """Every key under ``prefix`` (ListObjectsV2, 1000 a page); [] if the bucket is gone. Each
    page is counted in ``counts["s3_list_requests"]`` when given."""
    keys, token = [], {}
    while True:
        page = call("ListObjectsV2", s3.list_objects_v2, absent=frozenset({"NoSuchBucket"}),
                    Bucket=bucket, Prefix=prefix, **token)
        if counts is not None:  # retried attempts too (priced as billed)
            counts["s3_list_requests"] += 1 + call.last_retries()
        if page is None:
            return keys
        keys.extend(o["Key"] for o in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


class ObjectResources:
    """Bucket set-up and run clean-up (coordinator, deploy/teardown); idempotent."""

    def __init__(self, config: ObjectConfig, caller: Caller | None = None):
        self.config = config
        self.call = caller or Caller(config.aws)
        self.s3 = client("s3", config.aws)

    def ensure_bucket(self) -> None:
        if self.call("HeadBucket", self.s3.head_bucket, absent=_MISSING, Bucket=self.config.bucket) is None:
            region = self.s3.meta.region_name
            where = {} if region in (None, "us-east-1") else {
                "CreateBucketConfiguration": {"LocationConstraint": region}}
            self.call("CreateBucket", self.s3.create_bucket, absent=frozenset({"BucketAlreadyOwnedByYou"}),
                      Bucket=self.config.bucket, **where)

    def keys(self, prefix: str) -> list[str]:
        return list_keys(self.call, self.s3, self.config.bucket, prefix)

    def delete_run(self, run_id: str) -> int:
        """Delete every object of the run; the number deleted."""
        keys = self.keys(self.config.run_prefix(run_id))
        for start in range(0, len(keys), _DELETE_BATCH):
            answer = self.call("DeleteObjects", self.s3.delete_objects, Bucket=self.config.bucket,
                               Delete={"Objects": [{"Key": k} for k in keys[start:start + _DELETE_BATCH]],
                                       "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise ChannelError(f"s3://{self.config.bucket}/{first.get('Key')}: delete failed "
                                   f"({first.get('Code')}: {first.get('Message')})")
        return len(keys)


class ObjectChannel(Channel):
    """One worker's end: one PUT per step, ranged GETs of the others' objects."""

    def __init__(self, config: ObjectConfig, worker_id: int, n_workers: int, run_id: str,
                 caller: Caller | None = None):
        self.config = config
        self.worker = worker_id
        self.n_workers = n_workers
        self.run_id = run_id
        self.max_chunk_bytes = config.max_chunk_bytes
        self.call = caller or Caller(config.aws)
        self.s3 = client("s3", config.aws)
        self.counts: Counter[str] = Counter()
        self._parts_sent: Counter[int] = Counter()
        self._parts_read: dict[int, Counter[int]] = {}
        self._expected: tuple[int, frozenset[int]] | None = None   # (step, sources awaited)
        self._schedule: list | None = None   # [step, start, next poll, first poll that read]
        self._hint: int | None = None    # highest source read at the latest poll that read any
        self._lead, self._lead_history = 0.0, ()   # next_poll_lead's state
        self._clock, self._sleep = time.monotonic, time.sleep     # (tests drive a fake clock)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"s3-w{worker_id}")
        self._counting = threading.Lock()  # the pool's reads count into self.counts

    @classmethod
    def from_config(cls, config: Mapping, worker_id: int, n_workers: int, run_id: str) -> "ObjectChannel":
        return cls(ObjectConfig.parse(config), worker_id, n_workers, run_id)

    @classmethod
    def create_run(cls, config: Mapping, run_id: str, n_workers: int) -> dict:
        parsed = ObjectConfig.parse(config)
        if parsed.create_bucket:
            ObjectResources(parsed).ensure_bucket()
        return replace(parsed, create_bucket=False).to_dict()

    @classmethod
    def delete_run(cls, config: Mapping, run_id: str, n_workers: int) -> None:
        ObjectResources(ObjectConfig.parse(config)).delete_run(run_id)

    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        for _, chunk in chunks:
            if len(chunk) > self.max_chunk_bytes:
                raise ChannelError(f"chunk of {len(chunk)} bytes exceeds max_chunk_bytes={self.max_chunk_bytes}")
        if not chunks:  # nothing for anyone: no object (no reader awaits this worker at this step)
            return
        body = pack_object(chunks, self.n_workers)
        key = object_key(self.config, self.run_id, step, self.worker, self._parts_sent[step])
        # create-only (the worker role allows nothing else); a 412 is our own PUT whose answer was
        # lost and then retried (this worker is the only writer of its keys), or a stranger's
        # object at our key, which our readers would otherwise blame on this worker: read it back
        if self.call("PutObject", self.s3.put_object, Bucket=self.config.bucket, Key=key, Body=body,
                     IfNoneMatch="*", absent=frozenset({"PreconditionFailed", "412"})) is None:
            found = self._get(key, 0, len(body), absent=_MISSING | {"InvalidRange"})  # (empty: 416)
            if found is None or found[1] != len(body) or found[0] != body:
                raise ChannelError(f"s3://{self.config.bucket}/{key}: worker {self.worker}'s key holds an "
                                   "object it did not write (another writer in this run's prefix?)")
        self._parts_sent[step] += 1
        self.counts["s3_put_requests"] += 1 + self.call.last_retries()  # retried ones too
        self.counts["messages_sent"] += len(chunks)
        self.counts["bytes_sent"] += len(body)

    def expect(self, step: int, sources: Iterable[int]) -> None:
        wanted = frozenset(int(x) for x in sources)
        if any(not 0 <= x < self.n_workers or x == self.worker for x in wanted):
            raise ChannelError(f"worker {self.worker}: expected sources {sorted(wanted)} are not peers "
                               f"of 0..{self.n_workers - 1}")
        self._expected = (step, wanted)

    def receive(self, step: int, timeout: float) -> list[bytes]:
        """Polls ``step``'s awaited keys on the step's schedule (``poll_offset``) until something
        arrives or ``timeout`` is spent."""
        now = self._clock()
        deadline = now + timeout
        if self._schedule is None or self._schedule[0] != step:
            if self._schedule is not None:  # what the step before taught: this step's lead
                self._lead_history, self._lead = next_poll_lead(self.config, self._lead_history,
                                                                self._schedule[3], self._lead)
            # the step's first receive: poll 0 is due now; [step, start, next poll, first poll that read]
            self._schedule = [step, now, 0, None]
            self._parts_read = {step: Counter()}
        parts = self._parts_read[step]
        while True:
            due = self._schedule[1] + poll_offset(self.config, self._schedule[2], self._lead)
            if due > now:
                if due > deadline:
                    self._sleep(max(0.0, deadline - now))
                    return []
                self._sleep(due - now)
            found, read = self._poll(step, parts)
            if read and self._schedule[3] is None:
                self._schedule[3] = self._schedule[2]
            self._schedule[2] += 1
            if found:
                return found
            now = self._clock()

    def _poll(self, step: int, parts: Counter[int]) -> tuple[list[bytes], bool]:
        """Chunks of every new object of ``step`` from the sources awaited, marked read, and
        whether any object was read."""
        hinted = self._expected is not None and self._expected[0] == step
        if hinted:
            sources = sorted(self._expected[1])
        else:
            sources = [s for s in range(self.n_workers) if s != self.worker]
        self.counts["s3_polls"] += 1
        chunks: list[bytes] = []
        read: list[int] = []
        if hinted and self.config.sentinel and len(sources) > 1:
            # only the awaited sources are sure to write this step: a sentinel among them
            pick = sentinel_of(sources, self._hint)
            first = self._fetch(step, pick, parts[pick])
            if first is None:
                return [], False
            parts[pick] += 1
            chunks.extend(first)
            read.append(pick)
            sources = [s for s in sources if s != pick]
        if use_list(self.config, len(sources)):
            present = set(list_keys(self.call, self.s3, self.config.bucket,
                                    step_prefix(self.config, self.run_id, step), self.counts))
            sources = [s for s in sources
                       if object_key(self.config, self.run_id, step, s, parts[s]) in present]
        results = list(self._pool.map(lambda s: self._fetch(step, s, parts[s]), sources))
        for source, result in zip(sources, results):
            if result is not None:
                parts[source] += 1
                chunks.extend(result)
                read.append(source)
        if read:
            self._hint = max(read)
        return chunks, bool(read)

    def _get(self, key: str, first: int, last: int, absent: frozenset = _MISSING) -> tuple[bytes, int] | None:
        """Bytes ``first..last`` (inclusive) of ``key`` and the object's size; None if absent."""
        answer = self.call("GetObject", self.s3.get_object, absent=absent, Bucket=self.config.bucket,
                           Key=key, Range=f"bytes={first}-{last}")
        with self._counting:  # (reads run in the pool's threads)
            self.counts["s3_get_requests"] += 1 + self.call.last_retries()  # retried ones too
            if answer is None:
                self.counts["s3_get_misses"] += 1
        if answer is None:
            return None
        size = int(answer["ContentRange"].rsplit("/", 1)[-1]) if "ContentRange" in answer else answer["ContentLength"]
        data = answer["Body"].read()
        with self._counting:
            self.counts["s3_bytes_read"] += len(data)
        return data, size

    def _get_present(self, key: str, first: int, last: int) -> bytes:
        got = self._get(key, first, last)
        if got is None:
            raise ChannelError(f"s3://{self.config.bucket}/{key} vanished while being read")
        return got[0]

    def _fetch(self, step: int, source: int, part: int) -> list[bytes] | None:
        """The chunks for this worker in one object, or None if it is not there yet."""
        key = object_key(self.config, self.run_id, step, source, part)
        got = self._get(key, 0, self.config.probe_bytes - 1)
        if got is None:
            return None
        head, size = got
        index = read_index(head, size, self.n_workers, self.worker, key)
        while index.size_needed > len(head):  # at most twice: chunk table, then target lists
            head = self._get_present(key, 0, index.size_needed - 1)
            index = read_index(head, size, self.n_workers, self.worker, key)
        if not index.ranges:
            return []
        low = min(o for o, _ in index.ranges)
        high = max(o + n for o, n in index.ranges)
        if high > len(head):
            body = self._get_present(key, low, high - 1)
            base = low
        else:
            body, base = head, 0
        with self._counting:
            self.counts["bytes_received"] += high - low
            self.counts["messages_received"] += len(index.ranges)
        return [body[o - base:o - base + n] for o, n in index.ranges]

    def requests(self) -> dict[str, int]:
        """Billed-request and traffic counters (merged into the run's metrics and cost)."""
        return {**self.counts, "aws_retries": sum(self.call.retries.values())}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.s3.close()
