"""Byte storage by key: where shares, results, metrics and errors of a run live.

``LocalStorage`` is a directory (the embedded default); the ``s3`` kind is the AWS
adapters' ``S3Storage``, named by path and imported on first use (others can be added with
:func:`register_storage`). Keys are ``/``-separated
relative paths of plain characters (see :func:`check_key`); nothing is
ever unpickled: shares and results are ``np.savez`` archives read with
``allow_pickle=False`` (:func:`pack_arrays` / :func:`unpack_arrays`).
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import zipfile
from abc import ABC, abstractmethod
from typing import Callable, Mapping

import numpy as np

from fsd_runtime.kinds import Registry

_KEY = re.compile(r"^[A-Za-z0-9_.=-]+(/[A-Za-z0-9_.=-]+)*$")


class StorageError(ValueError):
    """A key is malformed, missing, or the stored bytes are not what they should be."""


def check_key(key: str) -> str:
    """Refuse keys that could escape the store (absolute, ``..``, odd characters)."""
    if not isinstance(key, str) or not _KEY.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise StorageError(f"bad storage key {key!r}")
    return key


class Storage(ABC):
    """Bytes by key. Implementations must make ``put`` atomic: a reader sees all or nothing."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing what was there."""

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` at ``key`` only if nothing is there; False if something was. Atomic in
        the stores here (a worker's claim on its share of a run: exactly one invocation wins)."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The bytes at ``key``; :class:`StorageError` if there are none."""

    def open(self, key: str):
        """A binary file object over the bytes at ``key`` (close it after use): readers that parse
        as they read (``unpack_arrays``) never hold the bytes and what they parse at once. This
        default holds the bytes (``get``); stores with files override it."""
        return io.BytesIO(self.get(key))

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds bytes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix + '/'``, sorted."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (a run's clean-up)."""
        for key in self.list(prefix):
            self.delete(key)

    def config(self) -> dict:
        """The JSON config that rebuilds this store in another process (``make_storage``)."""
        raise NotImplementedError


class LocalStorage(Storage):
    """A directory; ``put`` writes a temporary file and renames it into place."""

    def __init__(self, root: str, *, create: bool = True):
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)
        elif not os.path.isdir(self.root):
            raise StorageError(f"local store {self.root} does not exist (its run has ended?)")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _parent(self, path: str) -> str:
        """``path``'s directory, made where missing below the root, never the root or above: a
        store its run's clean-up removes meanwhile is not re-created (StorageError)."""
        parent, missing = os.path.dirname(path), []
        while parent != self.root and not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise StorageError(f"local store {self.root} is gone (its run has ended)") from None
        return os.path.dirname(path)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if not os.path.isdir(self.root):  # removed by its run's clean-up: never re-create it
            raise StorageError(f"local store {self.root} is gone (its run has ended)")
        self._parent(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        self._parent(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, path)  # fails if the key exists: atomic create
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"no stored object at {key!r} (in {self.root})") from None

    def open(self, key: str):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StorageError(f"no stored object at {key!r} (in {self.root})") from None

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        keys = []
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            keys.extend(f"{rel}/{name}" for name in files if not name.startswith(".tmp-"))
        return sorted(keys)

    def config(self) -> dict:
        return {"kind": "local", "root": self.root, "create": False}  # a worker never makes a store


def _local(config: Mapping) -> Storage:
    root = config.get("root")
    if not isinstance(root, str) or not root:
        raise StorageError(f"local storage needs a 'root' directory, got {root!r}")
    return LocalStorage(root, create=bool(config.get("create", True)))


#: AWS kinds are ``"module:attribute"`` paths, imported on first use (boto3 only when asked for),
#: as the channels' are.
_KINDS = Registry("storage", StorageError, {"local": _local, "s3": "fsd_runtime.aws.s3storage:from_config"})


def register_storage(kind: str, factory: Callable[[Mapping], Storage] | str) -> None:
    """Add a storage kind: a factory taking the config dict, or a ``"module:attribute"`` path to one."""
    _KINDS.register(kind, factory)


def make_storage(config: Mapping) -> Storage:
    """Build the store a config names, e.g. ``{"kind": "local", "root": "/tmp/run"}``."""
    return _KINDS.resolve(config)(config)


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Arrays to bytes (an uncompressed npz: no pickle, numeric dtypes only)."""
    for name, a in arrays.items():
        if np.asarray(a).dtype.hasobject:
            raise StorageError(f"array {name!r} has object dtype; only numeric arrays are stored")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data, where: str) -> dict[str, np.ndarray]:
    """Bytes from :func:`pack_arrays` (or a binary file object over them, read array by array:
    the arrays are then never held next to the whole bytes) back to arrays; anything else is a
    :class:`StorageError`."""
    try:
        with np.load(data if hasattr(data, "read") else io.BytesIO(data), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise StorageError(f"{where}: not a valid array archive ({exc})") from None
