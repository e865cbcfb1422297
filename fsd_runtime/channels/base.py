"""The channel contract the worker loop is written against.

A channel moves opaque chunks (bytes made by ``fsd_kernels.codec``) from one
worker to another. It does no decoding, deduplication or ordering: every
chunk carries run, step, source, target and chunk index in its header, and
the worker loop drops duplicates and holds early chunks. A channel may
deliver a chunk more than once and in any order (SQS does), but must never
lose one silently: a failed send raises :class:`ChannelError`.

``step`` is the worker loop's round counter (one per batch and layer); the
object channel keys by it, the others may ignore it.

Life cycle: the coordinator calls ``create_run`` once before any worker
starts (it may create resources and returns the config every worker gets
in its event) and ``delete_run`` once at the end, also after a failure.
Each worker builds its end with ``from_config(config, worker_id,
n_workers, run_id)`` (via ``fsd_runtime.channels.make_channel``) and
closes it when done. A channel must keep runs apart: chunks of another
run id are never delivered (the worker loop also drops them).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Mapping, Sequence


class ChannelError(RuntimeError):
    """A send or receive failed for good (after the channel's own retries)."""


class Channel(ABC):
    """One worker's end of a channel."""

    #: The largest chunk, in bytes, this channel carries (the codec's ``max_bytes``).
    max_chunk_bytes: int

    @abstractmethod
    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        """Send every ``(target worker, chunk)`` this worker has for ``step``, in one go
        so the channel can pack them into as few requests as it can; no chunks, no request."""

    @abstractmethod
    def receive(self, step: int, timeout: float) -> list[bytes]:
        """Chunks that have arrived for this worker, waiting up to ``timeout`` seconds for
        at least one; ``step`` is the round the caller is waiting for (a hint: chunks of
        other steps may come back too). Returns ``[]`` on timeout."""

    def expect(self, step: int, sources: Iterable[int]) -> None:
        """A hint before ``receive(step, ...)``: the workers whose chunks of ``step`` this worker
        still awaits (the worker loop knows them from its plan). A channel may then look for
        chunks of those sources only (the object channel reads and probes only their keys); it
        must still deliver whatever chunks it does receive. Channels that deliver everything
        pushed to them (local, queue) ignore it; without a hint, every peer may have sent."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping, worker_id: int, n_workers: int, run_id: str) -> "Channel":
        """Worker ``worker_id``'s end of the run's channel described by ``config``."""

    @classmethod
    def create_run(cls, config: Mapping, run_id: str, n_workers: int) -> dict:
        """Coordinator, before launch: set up the run's resources; return the workers' config."""
        return dict(config)

    @classmethod
    def delete_run(cls, config: Mapping, run_id: str, n_workers: int) -> None:
        """Coordinator, at the end (success or not): remove everything the run left behind."""

    def requests(self) -> dict[str, int]:
        """Billed requests and traffic this end has counted (AWS channels; see fsd_runtime.aws.cost),
        stored in the worker's metrics as ``requests`` and summed by the coordinator."""
        return {}

    def close(self) -> None:
        """Release this end (connections, and for the run's owner the run's resources)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
