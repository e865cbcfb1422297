"""LocalChannel: frames over Unix sockets read in the caller's thread, no reader threads.

Frames arrive whole and in order per sender, however the bytes are split; hostile length
fields fail cleanly; a peer that closes is no error; two workers sending each other far more
than the kernel buffers hold do not deadlock."""
import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from fsd_runtime.channels.base import ChannelError
from fsd_runtime.channels.local import LocalChannel, _socket_path

LENGTH = struct.Struct("<I")


@pytest.fixture
def run_dir():
    config = LocalChannel.create_run({"kind": "local"}, "test", 8)
    yield config["dir"]
    LocalChannel.delete_run(config, "test", 8)


@pytest.fixture
def channels(run_dir):
    made = []

    def make(worker_id, n_workers, **kwargs):
        channel = LocalChannel(run_dir, worker_id, n_workers, **kwargs)
        made.append(channel)
        return channel

    yield make
    for channel in made:
        channel.close()


def receive_n(channel, n, timeout=10.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += channel.receive(0, deadline - time.monotonic())
    return got


def raw_connection(run_dir, worker_id):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(_socket_path(run_dir, worker_id))
    return sock


def test_frames_round_trip_in_order_per_sender_from_many_senders(channels):
    n = 6
    ends = [channels(w, n) for w in range(n)]

    def sender(w):
        for i in range(40):  # several sends, some with two chunks for the same target
            chunks = [(0, f"{w}:{2 * i}".encode()), (0, f"{w}:{2 * i + 1}".encode() * (i + 1))]
            ends[w].send(i, chunks)

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(1, n)]
    for t in threads:
        t.start()
    got = receive_n(ends[0], 80 * (n - 1))
    for t in threads:
        t.join(10)
    assert len(got) == 80 * (n - 1)
    for w in range(1, n):
        mine = [g for g in got if g.startswith(f"{w}:".encode())]
        expected = [f"{w}:{2 * i}".encode() if k == 0 else f"{w}:{2 * i + 1}".encode() * (i + 1)
                    for i in range(40) for k in range(2)]
        assert mine == expected
    assert ends[0].receive(0, 0.0) == []


def test_empty_and_max_size_frames_arrive_and_oversized_chunks_are_refused(channels):
    limit = 1 << 20
    a, b = channels(0, 2, max_chunk_bytes=limit), channels(1, 2, max_chunk_bytes=limit)
    big = os.urandom(limit)
    sender = threading.Thread(target=a.send, args=(0, [(1, b""), (1, big), (1, big[:-1])]))
    sender.start()  # more than a socket buffer holds: the send finishes as b reads
    assert receive_n(b, 3) == [b"", big, big[:-1]]
    sender.join(10)
    with pytest.raises(ChannelError, match="exceeds"):
        a.send(0, [(1, big + b"x")])
    with pytest.raises(ChannelError, match="no worker 2"):
        a.send(0, [(2, b"x")])


def test_a_frame_written_byte_by_byte_is_assembled(channels, run_dir):
    channel = channels(0, 2)
    payloads = [b"first frame", bytes(range(256)) * 3]
    stream = b"".join(LENGTH.pack(len(p)) + p for p in payloads)
    sock = raw_connection(run_dir, 0)
    got = []
    for i in range(len(stream)):
        sock.sendall(stream[i:i + 1])
        got += channel.receive(0, 0.0 if i % 7 else 0.001)
        if i < len(LENGTH.pack(0)) + len(payloads[0]) - 1:
            assert got == []  # nothing before the first frame's last byte
    got += receive_n(channel, len(payloads) - len(got), timeout=2.0)
    assert got == payloads
    sock.close()


def test_an_oversized_length_field_is_an_error_without_a_big_allocation(channels, run_dir):
    channel = channels(0, 3, max_chunk_bytes=4096)
    good = channels(1, 3)
    sock = raw_connection(run_dir, 0)
    tracemalloc.start()
    try:
        sock.sendall(LENGTH.pack(0xFFFFFFFF) + b"junk")
        with pytest.raises(ChannelError, match="4294967295 bytes exceeds 4096"):
            receive_n(channel, 1, timeout=5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20
    good.send(0, [(0, b"still works")])  # other connections are unaffected
    assert receive_n(channel, 1) == [b"still works"]
    sock.close()


def test_a_peer_closing_mid_frame_loses_only_that_frame(channels, run_dir):
    channel = channels(0, 2)
    sock = raw_connection(run_dir, 0)
    sock.sendall(LENGTH.pack(5) + b"whole" + LENGTH.pack(100) + b"only part")
    sock.close()
    assert receive_n(channel, 1) == [b"whole"]
    assert channel.receive(0, 0.2) == []
    other = raw_connection(run_dir, 0)  # the listener still accepts
    other.sendall(LENGTH.pack(3) + b"new")
    assert receive_n(channel, 1) == [b"new"]
    other.close()


def test_receive_times_out_with_nothing_in_about_the_timeout(channels):
    channel = channels(0, 2)
    start = time.monotonic()
    assert channel.receive(0, 0.3) == []
    assert 0.29 <= time.monotonic() - start < 1.0
    start = time.monotonic()
    assert channel.receive(0, 0.0) == []
    assert channel.receive(0, -1.0) == []
    assert time.monotonic() - start < 0.1


def test_a_round_of_big_frames_waits_in_the_kernel_for_a_receiver_still_computing(channels):
    """300 KB to one peer is more than a default Unix socket buffer (~200 KB) holds."""
    a, b = channels(0, 2), channels(1, 2)
    frames = [os.urandom(100_000) for _ in range(3)]
    sender = threading.Thread(target=a.send, args=(0, [(1, f) for f in frames]), daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "the sender waited for a receiver that was not reading"
    assert receive_n(b, 3) == frames


def test_workers_sending_each_other_megabytes_at_once_do_not_deadlock(channels):
    """Each of three workers sends every other 8 MB before it receives anything: far more than
    the kernel's socket buffers (~200 KB a connection), so each must read while it sends."""
    n, chunk = 3, os.urandom(2 << 20)
    ends = [channels(w, n) for w in range(n)]
    received = {w: [] for w in range(n)}

    def worker(w):
        ends[w].send(0, [(t, chunk[:-w - 1]) for t in range(n) if t != w for _ in range(4)])
        received[w] += receive_n(ends[w], 4 * (n - 1))

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "deadlock: a send never finished"
    for w in range(n):
        assert sorted(len(c) for c in received[w]) == sorted(len(chunk) - s - 1 for s in range(n)
                                                             if s != w for _ in range(4))
        assert all(chunk.startswith(c) for c in received[w])


def test_sending_to_a_worker_that_has_gone_is_a_channel_error(channels):
    a, b = channels(0, 2, connect_timeout=0.2), channels(1, 2)
    a.send(0, [(1, b"hello")])
    assert receive_n(b, 1) == [b"hello"]
    b.close()
    with pytest.raises(ChannelError, match="cannot send to worker 1"):
        for _ in range(100):  # the first write after the peer closed may still be buffered
            a.send(0, [(1, b"x" * 1000)])
    with pytest.raises(ChannelError, match="cannot reach worker 1"):
        a.send(0, [(1, b"again")])


def test_close_is_idempotent_removes_the_socket_and_starts_no_threads(channels, run_dir):
    before = threading.active_count()
    a, b = channels(0, 2), channels(1, 2)
    a.send(0, [(1, b"x")])
    b.send(0, [(0, b"y")])
    assert receive_n(a, 1) == [b"y"] and receive_n(b, 1) == [b"x"]
    assert threading.active_count() == before
    a.close()
    a.close()
    assert not os.path.exists(_socket_path(run_dir, 0))
    with pytest.raises(ChannelError, match="closed"):
        a.receive(0, 0.0)
    with pytest.raises(ChannelError, match="closed"):
        a.send(0, [(1, b"x")])
    b.close()
    assert threading.active_count() == before


def test_a_socket_path_appears_only_once_its_worker_listens(channels, run_dir, monkeypatch):
    """A peer that finds ``w.sock`` connects at once: the path is not there while the worker
    has bound but not yet listened (a worker stopped in that gap, by SIGSTOP or the scheduler,
    left its peers retrying refused connections until their connect timeout)."""
    real = socket.socket
    at_listen = []

    class Spy(real):
        def listen(self, *args):
            at_listen.append(sorted(os.listdir(run_dir)))
            return super().listen(*args)

    monkeypatch.setattr(socket, "socket", Spy)
    channels(3, 4)
    monkeypatch.setattr(socket, "socket", real)
    assert at_listen == [[".3"]]   # bound under its private name, not yet under its own
    assert sorted(os.listdir(run_dir)) == ["3.sock"]
    sender = channels(0, 4, connect_timeout=0.05)
    sender.send(0, [(3, b"at once")])


def test_a_worker_that_cannot_listen_leaves_no_socket_file(run_dir, monkeypatch):
    real = socket.socket

    class Refusing(real):
        def listen(self, *args):
            raise OSError(98, "no listening today")

    monkeypatch.setattr(socket, "socket", Refusing)
    with pytest.raises(ChannelError, match="worker 1 cannot listen on .*no listening today"):
        LocalChannel(run_dir, 1, 2)
    monkeypatch.setattr(socket, "socket", real)
    assert os.listdir(run_dir) == []
