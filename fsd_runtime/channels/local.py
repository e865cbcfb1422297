"""LocalChannel: workers on one machine, over Unix-domain sockets in the run's directory.

Config: ``{"kind": "local", "dir": DIR, "max_chunk_bytes": 4 MiB, "connect_timeout": 30}``.
Worker w listens on ``DIR/w.sock`` (bound as ``DIR/.w`` and renamed once it
listens, so a path that exists always accepts); a sender keeps one connection per
target and writes length-prefixed frames (4-byte little-endian length, then
the chunk). ``create_run`` makes a fresh short directory (socket paths are
limited to ~100 bytes) and ``delete_run`` removes it.

No threads: the caller's thread does all the I/O. The listener and every
accepted connection sit, non-blocking, in one selector; ``receive`` accepts,
reads whatever has arrived into per-connection buffers and cuts complete
frames out of them. A thread per connection would cost a wake-up, a GIL
hand-off and queue locking per message, which on a small machine running
many workers is most of the channel's CPU. Outgoing connections ask for a
1 MiB send buffer, so a round's traffic waits in the kernel until its
receiver reads it. ``send`` writes without blocking and, whenever a peer's
buffer is full all the same, reads its own incoming connections until it can
write again: two workers sending each other more than the buffers hold both
make progress instead of waiting for each other forever. Frames read during
a send are handed out by the next ``receive``. One end is used by one thread
at a time.
"""
from __future__ import annotations

import os
import selectors
import shutil
import socket
import struct
import tempfile
import time
from typing import Mapping, Sequence

from fsd_runtime.channels.base import Channel, ChannelError

_LENGTH = struct.Struct("<I")
DEFAULT_MAX_CHUNK = 4 << 20
#: Largest frame a receiver accepts whatever the config says (a length field cannot make it allocate more).
MAX_FRAME = 64 << 20
#: Bytes one read may take from a connection (a round's traffic from one peer is usually far less).
_READ_SIZE = 256 << 10
#: Send buffer asked for each outgoing connection (the kernel doubles it, capped by net.core.wmem_max):
#: about 2 MB a peer has not read yet fits, so a sender does not wait for a receiver's compute.
_SEND_BUFFER = 1 << 20
#: Selector tag of an outgoing connection ``send`` waits to write to (incoming ones carry their buffer).
_WRITABLE = object()


#: Longest socket path used (AF_UNIX addresses hold 108 bytes on Linux, 104 on macOS, NUL included).
MAX_SOCKET_PATH = 100
#: Where socket directories go when $TMPDIR's path is too long for them.
SHORT_BASES = ("/tmp", "/var/tmp", "/dev/shm")


def _socket_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"{worker}.sock")


def _unready_path(directory: str, worker: int) -> str:
    """Where worker ``worker`` binds before it listens (no longer than its socket path)."""
    return os.path.join(directory, f".{worker}")


def _socket_dir(n_workers: int) -> str:
    longest = max(n_workers - 1, 0)
    for base in (None, *SHORT_BASES):
        if base is not None and not os.path.isdir(base):
            continue
        directory = tempfile.mkdtemp(prefix="fsd-", dir=base)
        if len(os.fsencode(_socket_path(directory, longest))) <= MAX_SOCKET_PATH:
            return directory
        os.rmdir(directory)
    raise ChannelError(f"no directory for the local channel's sockets: $TMPDIR ({tempfile.gettempdir()}) "
                       f"and {', '.join(SHORT_BASES)} give socket paths longer than {MAX_SOCKET_PATH} bytes "
                       "(set TMPDIR to a shorter directory)")


class LocalChannel(Channel):
    """One worker's end: a listening socket plus lazily opened connections to the others."""

    def __init__(self, directory: str, worker_id: int, n_workers: int, *,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK, connect_timeout: float = 30.0):
        self.directory = directory
        self.worker_id = worker_id
        self.n_workers = n_workers
        self.max_chunk_bytes = max_chunk_bytes
        self.connect_timeout = connect_timeout
        self._out: dict[int, socket.socket] = {}
        self._ready: list[bytes] = []  # complete frames not yet handed out
        self._scratch = bytearray(_READ_SIZE)
        self._closed = False
        path = _socket_path(directory, worker_id)
        if os.path.exists(path):
            os.unlink(path)
        # Bound under a private name and renamed once it listens: a peer that finds the path can
        # connect at once. (Bound under its own name, the path exists before listen(); a worker
        # stopped in between, e.g. descheduled, left its peers retrying refused connections.)
        unready = _unready_path(directory, worker_id)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(unready):
                os.unlink(unready)
            self._listener.bind(unready)
            self._listener.listen(max(n_workers, 8))
            os.rename(unready, path)
        except OSError as exc:
            self._listener.close()
            try:
                os.unlink(unready)
            except OSError:
                pass
            raise ChannelError(f"worker {worker_id} cannot listen on {path}: {exc}") from exc
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)

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
        """A fresh socket directory in $TMPDIR, or, if $TMPDIR's path is too long for a Unix
        socket's address, in the first short enough of :data:`SHORT_BASES`."""
        out = dict(config)
        out["dir"] = _socket_dir(n_workers)
        return out

    @classmethod
    def delete_run(cls, config: Mapping, run_id: str, n_workers: int) -> None:
        directory = config.get("dir")
        if isinstance(directory, str) and os.path.basename(directory).startswith("fsd-"):
            shutil.rmtree(directory, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelError(f"worker {self.worker_id}'s local channel is closed")

    def _poll(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` (None: for ever) for any event; accept and read what is ready.
        Returns whether the outgoing connection ``send`` waits for became writable."""
        writable = False
        for key, _ in self._selector.select(timeout):
            if key.data is _WRITABLE:
                writable = True
            elif key.fileobj is self._listener:
                self._accept()
            else:
                self._read(key.fileobj, key.data)
        return writable

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                raise ChannelError(f"worker {self.worker_id} cannot accept a connection: {exc}") from exc
            conn.setblocking(False)
            self._selector.register(conn, selectors.EVENT_READ, bytearray())

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        conn.close()

    def _read(self, conn: socket.socket, buffer: bytearray) -> None:
        """Move what ``conn`` has into its buffer and complete frames into ``_ready``. A peer that
        closes is no error (a frame it left unfinished is dropped); an oversized length field is."""
        scratch = self._scratch
        while True:
            try:
                n = conn.recv_into(scratch)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset by a peer that died: as good as closed
                n = 0
            if n == 0:
                self._drop(conn)
                return
            try:
                if buffer:
                    buffer += memoryview(scratch)[:n]
                    del buffer[:self._cut_frames(buffer)]
                else:  # the usual case: whole frames, cut straight from what was read
                    with memoryview(scratch)[:n] as data:
                        buffer += data[self._cut_frames(data):]
            except ChannelError:
                self._drop(conn)
                raise
            if n < len(scratch):
                return

    def _cut_frames(self, data: bytearray | memoryview) -> int:
        """Append the complete frames at the start of ``data`` to ``_ready``; the bytes they take."""
        pos, end = 0, len(data)
        with memoryview(data) as view:
            while end - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(view, pos)
                if length > self.max_chunk_bytes:
                    raise ChannelError(f"a frame of {length} bytes exceeds {self.max_chunk_bytes}")
                start = pos + _LENGTH.size
                if end - start < length:
                    break
                self._ready.append(view[start:start + length].tobytes())
                pos = start + length
        return pos

    def _connect(self, target: int) -> socket.socket:
        sock = self._out.get(target)
        if sock is not None:
            return sock
        path = _socket_path(self.directory, target)
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.001
        while True:
            sock = None
            try:
                if not os.path.exists(path):  # a peer still starting: a stat costs less than a socket
                    raise FileNotFoundError(f"{path} does not exist yet")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
                sock.connect(path)  # never waits for the peer: its backlog holds every worker's connection
                sock.setblocking(False)
                self._out[target] = sock
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if sock is not None:
                    sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"worker {self.worker_id} cannot reach worker {target} "
                                       f"within {self.connect_timeout} s: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.002)  # a peer still starting: retry soon, its data is on the run's path

    def _write(self, sock: socket.socket, data: bytes) -> None:
        """Write all of ``data``; while the peer's buffer is full, read incoming connections."""
        view = memoryview(data)
        while True:
            try:
                view = view[sock.send(view):]
            except (BlockingIOError, InterruptedError):
                pass
            if not view:
                return
            self._selector.register(sock, selectors.EVENT_WRITE, _WRITABLE)
            try:
                while not self._poll(None):
                    pass
            finally:
                self._selector.unregister(sock)

    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        self._check_open()
        frames: dict[int, list[bytes]] = {}
        for target, chunk in chunks:
            if not 0 <= target < self.n_workers:
                raise ChannelError(f"no worker {target} in a run of {self.n_workers}")
            if len(chunk) > self.max_chunk_bytes:
                raise ChannelError(f"chunk of {len(chunk)} bytes exceeds {self.max_chunk_bytes}")
            frames.setdefault(target, []).extend((_LENGTH.pack(len(chunk)), chunk))
        for target, parts in frames.items():  # one write a target, its chunks in the order given
            try:
                self._write(self._connect(target), b"".join(parts))
            except OSError as exc:
                self._forget(target)
                raise ChannelError(f"worker {self.worker_id} cannot send to worker {target}: {exc}") from exc
            except ChannelError:
                self._forget(target)
                raise

    def _forget(self, target: int) -> None:
        """Close the connection to ``target``: a frame may be half written, so this stream is done."""
        sock = self._out.pop(target, None)
        if sock is not None:
            sock.close()

    def receive(self, step: int, timeout: float) -> list[bytes]:
        self._check_open()
        deadline = time.monotonic() + max(timeout, 0.0)
        self._poll(0.0)
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._poll(remaining)
        items, self._ready = self._ready, []
        return items

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._out.values():
            sock.close()
        self._out.clear()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()
        try:
            os.unlink(_socket_path(self.directory, self.worker_id))
        except OSError:
            pass
