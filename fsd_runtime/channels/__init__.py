"""Channels carry encoded activation chunks between workers (local processes, SNS+SQS, S3)."""
from fsd_runtime.channels.base import Channel, ChannelError

__all__ = ["Channel", "ChannelError"]
