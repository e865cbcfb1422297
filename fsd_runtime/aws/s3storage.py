"""S3 as the run store: shares, results, metrics and errors of a run live in the deployment's bucket.

Config (what a worker event carries): ``{"kind": "s3", "bucket": NAME,
"aws": AwsSettings.to_dict()}``. Every call goes through
:class:`fsd_runtime.aws.Caller` (backoff on throttling, attempts counted);
a missing key is a :class:`~fsd_runtime.storage.StorageError`, any other
final failure too, so the worker loop sees one error kind for storage.
S3 PUTs are atomic, which is the contract :class:`Storage` asks for.
"""
from __future__ import annotations

from typing import Mapping

from fsd_runtime.aws import clients as aws
from fsd_runtime.channels.base import ChannelError
from fsd_runtime.storage import Storage, StorageError, check_key

#: Error codes S3 answers for a key that is not there (HEAD has no body, so only its status).
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
#: What S3 answers a conditional PUT on a key that exists (409: a concurrent conditional PUT).
_EXISTS = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
#: What S3 answers for a bucket that is gone (a torn-down deployment: nothing is left under it).
_NO_BUCKET = frozenset({"NoSuchBucket"})
#: delete_objects takes at most this many keys a call.
_DELETE_BATCH = 1000


class S3Storage(Storage):
    """Keys of one bucket; ``list`` and ``delete_prefix`` work by prefix, 1000 keys a request."""

    #: How often the coordinator may poll for results: each poll is a billed LIST.
    poll_seconds = 1.0

    def __init__(self, bucket: str, settings: aws.AwsSettings | None = None, *,
                 worker_settings: aws.AwsSettings | None = None, create_only: bool = False):
        """``worker_settings`` go into :meth:`config` instead of ``settings`` when the workers
        reach AWS differently (on Lambda: no profile, no local endpoint). ``create_only``: every
        PUT carries ``If-None-Match: *`` and never replaces an object (what the worker role's
        policy demands; :meth:`config` hands workers a create-only store)."""
        if not isinstance(bucket, str) or not 3 <= len(bucket) <= 63:
            raise StorageError(f"s3 storage needs a bucket name of 3..63 characters, got {bucket!r}")
        self.bucket = bucket
        self.settings = settings or aws.AwsSettings()
        self.worker_settings = worker_settings or self.settings
        self.s3 = aws.client("s3", self.settings)
        self.call = aws.Caller(self.settings)
        self.create_only = bool(create_only)
        #: Bytes of every object this store put or got, by key (the cost model's share and result sizes).
        self.sizes: dict[str, int] = {}

    def _call(self, name: str, key: str, operation, *, absent: frozenset[str] = frozenset(), **kwargs):
        try:
            return self.call(name, operation, absent=absent, Bucket=self.bucket, **kwargs)
        except ChannelError as exc:
            raise StorageError(f"s3://{self.bucket}/{key}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        if self.create_only:
            if not self.create(key, data):
                raise StorageError(f"s3://{self.bucket}/{key} exists and this store only creates objects")
            return
        self._call("PutObject", key, self.s3.put_object, Key=check_key(key), Body=data)
        self.sizes[key] = len(data)

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): S3 refuses it if the key exists, atomically."""
        answer = self._call("PutObject", key, self.s3.put_object, Key=check_key(key), Body=data,
                            IfNoneMatch="*", absent=_EXISTS)
        return answer is not None

    def get(self, key: str) -> bytes:
        response = self._call("GetObject", key, self.s3.get_object, Key=check_key(key), absent=_MISSING)
        if response is None:
            raise StorageError(f"no stored object at s3://{self.bucket}/{key}")
        data = response["Body"].read()
        self.sizes[key] = len(data)
        return data

    def exists(self, key: str) -> bool:
        """A HEAD (billed like a GET, a twelfth of a LIST)."""
        response = self._call("HeadObject", key, self.s3.head_object, Key=check_key(key),
                              absent=_MISSING)
        return response is not None

    def delete(self, key: str) -> None:
        self._call("DeleteObject", key, self.s3.delete_object, Key=check_key(key))

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        token: dict = {}
        while True:
            page = self._call("ListObjectsV2", prefix, self.s3.list_objects_v2,
                              Prefix=check_key(prefix) + "/", absent=_NO_BUCKET, **token)
            if page is None:  # the bucket is gone (torn down): nothing is under any prefix
                return sorted(keys)
            keys.extend(o["Key"] for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start:start + _DELETE_BATCH]]
            response = self._call("DeleteObjects", prefix, self.s3.delete_objects,
                                  Delete={"Objects": batch, "Quiet": True})
            if response and response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(f"s3://{self.bucket}/{first.get('Key')}: delete failed "
                                   f"({first.get('Code')}: {first.get('Message')})")

    def config(self) -> dict:
        return {"kind": "s3", "bucket": self.bucket, "aws": self.worker_settings.to_dict(), "create_only": True}


def from_config(config: Mapping) -> S3Storage:
    """The store a ``{"kind": "s3", "bucket": ..., "aws": {...}}`` config names."""
    try:
        settings = aws.AwsSettings.from_dict(config.get("aws"))
    except (TypeError, ValueError) as exc:
        raise StorageError(f"s3 storage config: {exc}") from None
    unknown = sorted(set(config) - {"kind", "bucket", "aws", "create_only"})
    if unknown:
        raise StorageError(f"s3 storage config has unknown fields {unknown}")
    create_only = config.get("create_only", True)
    if not isinstance(create_only, bool):
        raise StorageError(f"s3 storage 'create_only' must be true or false, got {create_only!r}")
    return S3Storage(config.get("bucket"), settings, create_only=create_only)
