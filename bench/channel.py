"""LocalChannel cost: N processes exchanging messages all-to-all, reader threads vs none.

    python bench/channel.py [--processes 8] [--rounds 19] [--bytes 4096] [--work-ms 0] [--repeat 5] [--json]

Each of N processes (forked, one channel end each, all in one run directory)
does one untimed warm-up round (connections open), waits at a barrier, then
R timed rounds: spin ``--work-ms`` of its own CPU time (a worker's layer
compute; the GIL held, as by the real kernels), send every other process one
M-byte message, then receive until it has the N-1 messages of this round (a
message of a later round is held for it). Reported per implementation, as the median of ``--repeat``
runs interleaved (threaded, selector, threaded, ...):

* ``round_ms``: the slowest process's timed wall time / R;
* ``cpu_s``: user + system CPU seconds of all processes over the timed
  rounds (``resource.getrusage(RUSAGE_SELF)`` in each, all its threads).

``selector`` is ``fsd_runtime.channels.local.LocalChannel``; ``threaded`` is
the implementation it replaced, kept below only for this comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import resource
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Sequence

import numpy as np

from fsd_runtime.channels.base import Channel, ChannelError
from fsd_runtime.channels.local import LocalChannel

_LENGTH = struct.Struct("<I")
_TAG = struct.Struct("<II")  # round, source


class ThreadedLocalChannel(Channel):
    """LocalChannel's I/O as it was before it lost its reader threads (commit a7502bd): an
    accept thread plus one reader thread per incoming connection moving frames into a queue
    (config checks and connect retries left out). Kept here, not in the package, only so
    the benchmark can compare the two."""

    def __init__(self, directory: str, worker_id: int, n_workers: int, *,
                 max_chunk_bytes: int = 4 << 20, connect_timeout: float = 30.0):
        self.directory = directory
        self.worker_id = worker_id
        self.n_workers = n_workers
        self.max_chunk_bytes = max_chunk_bytes
        self.connect_timeout = connect_timeout
        self._inbox: queue.Queue = queue.Queue()
        self._out: dict[int, socket.socket] = {}
        self._closed = threading.Event()
        path = os.path.join(directory, f"{worker_id}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(max(n_workers, 8))
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def from_config(cls, config, worker_id, n_workers, run_id):
        raise NotImplementedError("benchmark only")

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
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(os.path.join(self.directory, f"{target}.sock"))  # every listener is up (barrier)
            self._out[target] = sock
        return sock

    def send(self, step: int, chunks: Sequence[tuple[int, bytes]]) -> None:
        for target, chunk in chunks:
            self._connect(target).sendall(_LENGTH.pack(len(chunk)) + chunk)

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
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


IMPLEMENTATIONS = {"threaded": ThreadedLocalChannel, "selector": LocalChannel}


def exchange(channel: Channel, me: int, n: int, rnd: int, payload: bytes, early: dict[int, int]) -> None:
    """One all-to-all round: send everyone this round's message, wait for everyone's."""
    tag = _TAG.pack(rnd, me)
    channel.send(rnd, [(t, tag + payload) for t in range(n) if t != me])
    got = early.pop(rnd, 0)
    while got < n - 1:
        messages = channel.receive(rnd, 30.0)
        if not messages:
            raise ChannelError(f"process {me}: round {rnd} incomplete after 30 s")
        for message in messages:
            r, _ = _TAG.unpack_from(message)
            if r == rnd:
                got += 1
            else:
                early[r] = early.get(r, 0) + 1


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def spin(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def worker(kind: str, directory: str, me: int, n: int, rounds: int, size: int, work: float,
           barrier, results) -> None:
    channel = IMPLEMENTATIONS[kind](directory, me, n)
    try:
        barrier.wait()  # every listener is up
        payload, early = os.urandom(size - _TAG.size), {}
        exchange(channel, me, n, 0, payload, early)
        barrier.wait()
        cpu, start = cpu_seconds(), time.perf_counter()
        for rnd in range(1, rounds + 1):
            spin(work)
            exchange(channel, me, n, rnd, payload, early)
        results.put((time.perf_counter() - start, cpu_seconds() - cpu))
        barrier.wait()  # nobody closes while others still read
    finally:
        channel.close()


def run_once(kind: str, n: int, rounds: int, size: int, work: float) -> dict:
    context = multiprocessing.get_context("fork")
    directory = tempfile.mkdtemp(prefix="fsd-bench-")
    barrier, results = context.Barrier(n), context.Queue()
    processes = [context.Process(target=worker, args=(kind, directory, me, n, rounds, size, work, barrier, results))
                 for me in range(n)]
    try:
        for p in processes:
            p.start()
        measured = [results.get(timeout=120) for _ in range(n)]
        for p in processes:
            p.join(30)
        if any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"{kind}: a benchmark process failed")
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
        shutil.rmtree(directory, ignore_errors=True)
    return {"round_ms": max(wall for wall, _ in measured) / rounds * 1e3,
            "cpu_s": sum(cpu for _, cpu in measured)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=19)
    parser.add_argument("--bytes", type=int, default=4096, help="message size (>= 8)")
    parser.add_argument("--work-ms", type=float, default=0.0, help="CPU time each process spins a round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.processes < 2 or args.rounds < 1 or args.repeat < 1 or not 8 <= args.bytes <= 4 << 20 \
            or not 0 <= args.work_ms <= 1000:
        parser.error("need --processes >= 2, --rounds >= 1, --repeat >= 1, 8 <= --bytes <= 4 MiB, "
                     "0 <= --work-ms <= 1000")
    runs: dict[str, list[dict]] = {kind: [] for kind in IMPLEMENTATIONS}
    for _ in range(args.repeat):
        for kind in IMPLEMENTATIONS:
            runs[kind].append(run_once(kind, args.processes, args.rounds, args.bytes, args.work_ms / 1e3))
    report = {"processes": args.processes, "rounds": args.rounds, "bytes": args.bytes, "work_ms": args.work_ms,
              "repeat": args.repeat,
              "cpus": os.cpu_count(), "implementations": {}}
    for kind, measured in runs.items():
        report["implementations"][kind] = {
            "round_ms": float(np.median([m["round_ms"] for m in measured])),
            "cpu_s": float(np.median([m["cpu_s"] for m in measured])),
            "runs": measured,
        }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.processes} processes, {args.rounds} rounds all-to-all of {args.bytes} B messages, "
              f"{args.work_ms} ms CPU a round each, median of {args.repeat}")
        print(f"{'implementation':<15}{'ms/round':>10}{'CPU s':>9}")
        for kind, r in report["implementations"].items():
            print(f"{kind:<15}{r['round_ms']:>10.2f}{r['cpu_s']:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
