"""Registries of pluggable kinds (storage, channel, launcher), as configs name them.

A kind maps to an object (a class or factory) or to a ``"module:attribute"``
path imported on first use, so optional dependencies such as boto3 load only
when a config asks for an AWS kind.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping


class Registry:
    """Kinds of one sort of thing; unknown kinds raise ``error`` (a ValueError subclass)."""

    def __init__(self, what: str, error: type[ValueError], kinds: Mapping[str, Any]):
        self.what = what
        self.error = error
        self.kinds = dict(kinds)

    def register(self, kind: str, target: Any) -> None:
        """Add or replace a kind: the object, or a ``"module:attribute"`` path to it."""
        self.kinds[kind] = target

    def resolve(self, config: Mapping) -> Any:
        """The object for ``config["kind"]``, imported if it was given as a path."""
        kind = config.get("kind") if isinstance(config, Mapping) else None
        target = self.kinds.get(kind) if isinstance(kind, str) else None
        if target is None:
            raise self.error(f"unknown {self.what} kind {kind!r}; known: {sorted(self.kinds)}")
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        return target
