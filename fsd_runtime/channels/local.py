"""LocalChannel: workers on one machine, over Unix-domain sockets in the run's directory.

Config: ``{"kind": "local", "dir": DIR, "max_chunk_bytes": 4 MiB, "connect_timeout": 30}``.
Worker w listens on ``DIR/w.sock``; a sender keeps one connection per
target and writes length-prefixed frames (4-byte little-endian length, then
the chunk). A reader thread per incoming connection moves frames into a
queue, so a sender never waits for the receiver's compute. ``create_run``
makes a fresh short directory (socket paths are limited to ~100 bytes) and
``delete_run`` removes it.
"""
from __future__ import annotations

import os
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Mapping, Sequence

from fsd_runtime.channels.base import Channel, ChannelError

_LENGTH = struct.Struct("<I")
DEFAULT_MAX_CHUNK = 4 << 20
#: Largest frame a receiver accepts whatever the config says (a length field cannot make it allocate more).
MAX_FRAME = 64 << 20


def _socket_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"{worker}.sock")


class LocalChannel(Channel):
    """One worker's end: a listening socket plus lazily opened connections to the others."""

    def __init__(self, directory: str, worker_id: int, n_workers: int, *,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK, connect_timeout: float = 30.0):
        self.directory = directory
        self.worker_id = worker_id
        self.n_workers = n_workers
        self.max_chunk_bytes = max_chunk_bytes
        self.connect_timeout = connect_timeout
        self._inbox: queue.Queue = queue.Queue()
        self._out: dict[int, socket.socket] = {}
        self._closed = threading.Event()
        path = _socket_path(directory, worker_id)
        if os.path.exists(path):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
        except OSError as exc:
            self._listener.close()
            raise ChannelError(f"worker {worker_id} cannot listen on {path}: {exc}") from exc
        self._listener.listen(max(n_workers, 8))
        threading.Thread(target=self._accept, daemon=True, name=f"local-accept-{worker_id}").start()

    @classmethod
    def from_config(cls, config: Mapping, worker_id: int, n_workers: int, run_id: str) -> "LocalChannel":
        from fsd_runtime.channels import ChannelConfigError

        directory = config.get("dir")
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise ChannelConfigError(f"local channel needs an existing 'dir', got {directory!r}")
        max_chunk = config.get("max_chunk_bytes", DEFAULT_MAX_CHUNK)
        if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or not 256 <= max_chunk <= MAX_FRAME:
            raise ChannelConfigError(f"local channel max_chunk_bytes must be in 256..{MAX_FRAME}, got {max_chunk!r}")
        connect = config.get("connect_timeout", 30.0)
        if isinstance(connect, bool) or not isinstance(connect, (int, float)) or not 0 < connect <= 3600:
            raise ChannelConfigError(f"local channel connect_timeout must be in (0, 3600] s, got {connect!r}")
        return cls(directory, worker_id, n_workers, max_chunk_bytes=max_chunk, connect_timeout=float(connect))

    @classmethod
    def create_run(cls, config: Mapping, run_id: str, n_workers: int) -> dict:
        out = dict(config)
        out["dir"] = tempfile.mkdtemp(prefix="fsd-")
        return out

    @classmethod
    def delete_run(cls, config: Mapping, run_id: str, n_workers: int) -> None:
        directory = config.get("dir")
        if isinstance(directory, str) and os.path.basename(directory).startswith("fsd-"):
            shutil.rmtree(directory, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            stream = conn.makefile("rb")
            while True:
                head = stream.read(_LENGTH.size)
                if len(head) < _LENGTH.size:
                    return
                (length,) = _LENGTH.unpack(head)
                if length > self.max_chunk_bytes:
                    self._inbox.put(ChannelError(f"a frame of {length} bytes exceeds {self.max_chunk_bytes}"))
                    return
                body = stream.read(length)
                if len(body) < length:
                    return
                self._inbox.put(body)

    def _connect(self, target: int) -> socket.socket:
        sock = self._out.get(target)
        if sock is not None:
            return sock
        path = _socket_path(self.directory, target)
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                self._out[target] = sock
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"worker {self.worker_id} cannot reach worker {target} "
                                       f"within {self.connect_timeout} s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.002)  # a peer still starting: retry soon, its data is on the run's path

    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        for target, chunk in chunks:
            if not 0 <= target < self.n_workers:
                raise ChannelError(f"no worker {target} in a run of {self.n_workers}")
            if len(chunk) > self.max_chunk_bytes:
                raise ChannelError(f"chunk of {len(chunk)} bytes exceeds {self.max_chunk_bytes}")
            try:
                self._connect(target).sendall(_LENGTH.pack(len(chunk)) + chunk)
            except OSError as exc:
                self._out.pop(target, None)
                raise ChannelError(f"worker {self.worker_id} cannot send to worker {target}: {exc}") from exc

    def receive(self, step: int, timeout: float) -> list[bytes]:
        try:
            items = [self._inbox.get(timeout=max(timeout, 0.0))]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, ChannelError):
                raise item
        return items

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in self._out.values():
            sock.close()
        self._out.clear()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        try:
            os.unlink(_socket_path(self.directory, self.worker_id))
        except OSError:
            pass
