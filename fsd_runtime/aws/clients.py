"""boto3 clients from the usual places, and the one retry loop every AWS adapter calls through.

Settings come, in order, from the explicit :class:`AwsSettings` (what the
coordinator puts in a worker event), then boto3's own chain: ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` and the per-service
``AWS_ENDPOINT_URL_SQS``/``_SNS``/``_S3``, ``~/.aws/config``, instance roles.

botocore's own retries are switched off: :class:`Caller` retries throttling,
5xx and connection errors with exponential backoff and full jitter, so every
attempt is counted (attempts are billed requests) and a final failure becomes
one :class:`~fsd_runtime.channels.base.ChannelError` naming the operation.
"""
from __future__ import annotations

import functools
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

from fsd_runtime.channels.base import ChannelError

#: Error codes AWS services use for "slow down" (SNS, SQS, S3, Lambda).
THROTTLING_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "SlowDown", "KMSThrottlingException", "AWS.SimpleQueueService.RequestThrottled",
})
#: SNS and SQS bill every started 64 KiB of a call's payload as one request (S3 bills per call).
BILLING_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class AwsSettings:
    """Where and how to reach AWS; ``None`` fields fall through to boto3's usual chain."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    #: Attempts per call (1 = no retry), backoff base and cap in seconds.
    max_attempts: int = 8
    backoff_base: float = 0.05
    backoff_cap: float = 5.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> "AwsSettings":
        """Rebuild from :meth:`to_dict` output (a worker event's ``aws`` entry); unknown keys are errors."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown AWS settings {unknown}")
        settings = cls(**config)
        for name in ("region", "profile", "endpoint_url"):
            if not isinstance(getattr(settings, name), (str, type(None))):
                raise ValueError(f"AWS setting {name!r} must be a string or null, got {getattr(settings, name)!r}")
        if not isinstance(settings.max_attempts, int) or settings.max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, got {settings.max_attempts!r}")
        return settings


def adapter_fields(config: Mapping[str, Any], known: Iterable[str], what: str) -> dict:
    """An adapter config dict's fields without ``kind``, unknown fields refused, ``aws`` parsed."""
    fields = dict(config)
    fields.pop("kind", None)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{what} config has unknown fields {unknown}")
    fields["aws"] = AwsSettings.from_dict(fields.get("aws"))
    return fields


def billed_chunks(payload_bytes: int) -> int:
    """Requests SNS/SQS bill for one call carrying ``payload_bytes`` (at least one)."""
    return max(1, -(-payload_bytes // BILLING_CHUNK_BYTES))


_SESSION_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _session(profile: str | None, region: str | None) -> boto3.session.Session:
    """One session per profile and region: creating clients from it is 5x faster than anew."""
    return boto3.session.Session(profile_name=profile, region_name=region)


def client(service: str, settings: AwsSettings | None = None, *, read_timeout: float = 60.0):
    """A boto3 client for ``service`` with botocore retries off (see :class:`Caller`).

    ``read_timeout`` must exceed the longest long poll (20 s) the caller makes."""
    settings = settings or AwsSettings()
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=10, read_timeout=read_timeout, max_pool_connections=16)
    with _SESSION_LOCK:  # sessions are not thread-safe; the clients they make are
        return _session(settings.profile, settings.region).client(
            service, endpoint_url=settings.endpoint_url, config=config)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in THROTTLING_CODES or status >= 500
    return isinstance(exc, (BotoConnectionError, BotoCoreError))


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore exception ('' if it has none)."""
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


class Caller:
    """Calls AWS operations with backoff and counts every attempt by operation name."""

    def __init__(self, settings: AwsSettings | None = None, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings or AwsSettings()
        self.attempts: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self._sleep = sleep
        self._last = threading.local()  # this thread's last call (the channels call from several)
        self._counting = threading.Lock()  # ``+=`` on a Counter is not atomic across threads

    def last_retries(self) -> int:
        """How many attempts this thread's last call retried (each is billed like the call)."""
        return getattr(self._last, "retries", 0)

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0.0, min(self.settings.backoff_cap, self.settings.backoff_base * 2 ** attempt))

    def __call__(self, name: str, operation: Callable[..., dict], /, *,
                 absent: frozenset[str] = frozenset(), **kwargs) -> dict | None:
        """``operation(**kwargs)``, retried while retryable; ``None`` when it fails with an
        error code in ``absent`` (e.g. NoSuchKey); ChannelError once it cannot succeed."""
        attempt = 0
        while True:
            with self._counting:
                self.attempts[name] += 1
            self._last.retries = attempt
            try:
                return operation(**kwargs)
            except (ClientError, BotoCoreError) as exc:
                if error_code(exc) in absent:
                    return None
                attempt += 1
                if not _retryable(exc):
                    raise ChannelError(f"AWS {name} failed: {exc}") from exc
                if attempt == self.settings.max_attempts:
                    raise ChannelError(f"AWS {name} still failing after {attempt} attempts: {exc}") from exc
                with self._counting:
                    self.retries[name] += 1
                self._sleep(self.backoff(attempt - 1))
