"""Channels carry encoded activation chunks between workers (local processes, SNS+SQS, S3).

``make_channel(config, worker_id, n_workers, run_id)`` builds the kind the
config names. Kinds map to ``"module:Class"`` paths imported on first use,
so boto3 is only imported when an AWS kind is used; adapters (and tests)
add kinds with :func:`register_channel`.
"""
from __future__ import annotations

from typing import Mapping

from fsd_runtime.channels.base import Channel, ChannelError
from fsd_runtime.kinds import Registry


class ChannelConfigError(ValueError):
    """A channel config names an unknown kind or lacks what the kind needs."""


_KINDS = Registry("channel", ChannelConfigError, {
    "local": "fsd_runtime.channels.local:LocalChannel",
    "queue": "fsd_runtime.channels.queue:QueueChannel",
    "object": "fsd_runtime.channels.object:ObjectChannel",
})


def register_channel(kind: str, cls: type[Channel] | str) -> None:
    """Add (or replace) a channel kind: a Channel subclass or a ``"module:Class"`` path."""
    _KINDS.register(kind, cls)


def channel_class(config: Mapping) -> type[Channel]:
    """The Channel subclass for ``config["kind"]``."""
    return _KINDS.resolve(config)


def make_channel(config: Mapping, worker_id: int, n_workers: int, run_id: str) -> Channel:
    """Worker ``worker_id``'s end of the channel ``config`` describes."""
    return channel_class(config).from_config(config, worker_id, n_workers, run_id)


__all__ = ["Channel", "ChannelConfigError", "ChannelError", "channel_class", "make_channel",
           "register_channel"]
