"""Worker events, storage and the worker loop (in-process: threads and a queue hub as channel)."""
import queue
import socket
import struct
import threading

import numpy as np
import pytest

import fsd_kernels
from fsd_kernels import codec
from fsd_runtime import events as ev
from fsd_runtime import model, partition
from fsd_runtime.channels import Channel, ChannelConfigError, ChannelError, make_channel
from fsd_runtime.plan import build_shares
from fsd_runtime.storage import StorageError, check_key, make_storage
from fsd_runtime.worker import INPUTS, OUTPUTS, WorkerError, WorkerLoop, _Batch, _send_plan, wire_run_id

EVENT = dict(run_id="r-1", worker_id=1, n_workers=4, fanout=2, storage={"kind": "local", "root": "/tmp/x"},
             prefix="runs/r-1", channel={"kind": "local", "dir": "/tmp/y"}, launcher={"kind": "process"})


def test_event_round_trips_through_json():
    event = ev.parse(EVENT)
    assert ev.parse(event.to_json()) == event
    assert event.for_worker(3).worker_id == 3 and event.for_worker(3).run_id == "r-1"


@pytest.mark.parametrize("change, field", [
    ({"worker_id": 4}, "worker_id"), ({"n_workers": 0}, "n_workers"), ({"fanout": 0}, "fanout"),
    ({"run_id": "a/b"}, "run_id"), ({"prefix": "../etc"}, "prefix"), ({"prefix": "/abs"}, "prefix"),
    ({"channel": {"dir": "x"}}, "channel"), ({"launcher": "process"}, "launcher"),
    ({"receive_timeout": 0}, "receive_timeout"), ({"batch_size": 0}, "batch_size"),
    ({"worker_id": True}, "worker_id"), ({"surprise": 1}, "unknown"), ({"version": 9}, "version"),
    ({"park_saturated": "no"}, "park_saturated"), ({"park_saturated": 0}, "park_saturated"),
])
def test_bad_events_name_the_field(change, field):
    with pytest.raises(ev.EventError, match=field):
        ev.parse({**EVENT, **change})


def test_missing_fields_and_non_objects_are_refused():
    with pytest.raises(ev.EventError, match="lacks"):
        ev.parse({k: v for k, v in EVENT.items() if k != "storage"})
    for bad in ("[1, 2]", "{not json", 42):
        with pytest.raises(ev.EventError):
            ev.parse(bad)


def test_local_storage_put_get_list_delete(tmp_path):
    store = make_storage({"kind": "local", "root": str(tmp_path)})
    store.put("runs/a/shares/0.npz", b"zero")
    store.put("runs/a/shares/1.npz", b"one")
    store.put("runs/b/x", b"other run")
    assert store.get("runs/a/shares/1.npz") == b"one"
    assert store.list("runs/a") == ["runs/a/shares/0.npz", "runs/a/shares/1.npz"]
    store.delete_prefix("runs/a")
    assert store.list("runs/a") == [] and store.exists("runs/b/x")
    with pytest.raises(StorageError, match="no stored object"):
        store.get("runs/a/shares/0.npz")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a/./b", "a b", ""])
def test_storage_refuses_keys_that_escape(key):
    with pytest.raises(StorageError):
        check_key(key)


def test_unknown_kinds_are_clear_errors():
    with pytest.raises(StorageError, match="unknown storage kind"):
        make_storage({"kind": "tape"})
    with pytest.raises(ChannelConfigError, match="unknown channel kind"):
        make_channel({"kind": "pigeon"}, 0, 1, "r")


class Hub:
    """In-process mailboxes: one queue per worker."""

    def __init__(self, n):
        self.boxes = [queue.Queue() for _ in range(n)]


class HubChannel(Channel):
    max_chunk_bytes = 4096   # small, so messages really are split into chunks

    def __init__(self, hub, me):
        self.hub, self.me = hub, me

    @classmethod
    def from_config(cls, config, worker_id, n_workers, run_id):
        raise NotImplementedError

    def send(self, step, chunks):
        for target, chunk in chunks:
            self.hub.boxes[target].put(chunk)

    def receive(self, step, timeout):
        try:
            out = [self.hub.boxes[self.me].get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.hub.boxes[self.me].empty():
            out.append(self.hub.boxes[self.me].get())
        return out


def run_threads(shares, channels, receive_timeout=20, **kwargs):
    results, errors = [None] * len(shares), []

    def work(p):
        try:
            results[p] = WorkerLoop(shares[p], channels[p], run_id="t", receive_timeout=receive_timeout,
                                    **kwargs).run()
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(p,)) for p in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def assemble(results, n_images, n_neurons, ymax):
    final = np.zeros((n_images, n_neurons), np.float32)
    for r in results:
        final[np.ix_(r.active, r.neurons)] = r.rows.T
        final[r.saturated] = ymax
    return final


@pytest.mark.parametrize("n_workers, batch_size", [(1, None), (2, None), (3, 70), (5, 33)])
def test_worker_loop_is_bit_identical_to_serial_on_a_synthetic_net(n_workers, batch_size):
    ds = model.synthetic(1024, 24, 300, seed=5)
    net = ds.network.pack()
    shares = build_shares(net, *ds.images.arrays, partition.hypergraph(net, n_workers))
    hub = Hub(n_workers)
    results, errors = run_threads(shares, [HubChannel(hub, p) for p in range(n_workers)],
                                  batch_size=batch_size)
    assert not errors
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    expected = np.zeros((300, 1024), np.float32)
    rows = np.repeat(np.arange(300), np.diff(serial.indptr))
    expected[rows, serial.indices] = serial.data
    got = assemble(results, 300, 1024, net.ymax)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert 0 < serial.categories.size       # the check means something: some images survive


def _alive_and_saturated(ds, biases, last: int, ymax: float = 32.0) -> tuple[int, int]:
    """(images with a nonzero row, images whose row is all ymax) after layer ``last``, serially."""
    a = fsd_kernels.infer(*ds.images.arrays,
                          model.Network(1024, ds.network.layers[:last + 1], biases[:last + 1]).pack())
    full = np.zeros(a.indptr.shape[0] - 1, np.int64)
    np.add.at(full, np.repeat(np.arange(full.shape[0]), np.diff(a.indptr)), a.data == ymax)
    return int(np.count_nonzero(np.diff(a.indptr))), int(np.count_nonzero(full == 1024))


def test_parked_saturated_images_come_back_before_a_layer_that_breaks_saturation():
    """Layer 14 maps an all-ymax image to something else (bias -40 on ten neurons): images parked
    as saturated must be put back as ymax columns there, exactly as the serial run does."""
    ds = model.synthetic(1024, 24, 300, seed=5)
    biases = [b.copy() for b in ds.network.biases]
    biases[14][:10] = -40.0
    net = model.Network(1024, ds.network.layers, biases).pack()
    assert not net.keeps_saturated[14] and net.keeps_saturated[:14].all()
    shares = build_shares(net, *ds.images.arrays, partition.hypergraph(net, 3))
    hub = Hub(3)
    results, errors = run_threads(shares, [HubChannel(hub, p) for p in range(3)])
    assert not errors
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    expected = np.zeros((300, 1024), np.float32)
    expected[np.repeat(np.arange(300), np.diff(serial.indptr)), serial.indices] = serial.data
    np.testing.assert_array_equal(assemble(results, 300, 1024, net.ymax).view(np.uint32),
                                  expected.view(np.uint32))
    active = [sum(r.metrics["layers"][l][r.metrics["fields"].index("images_active")] for r in results) / 3
              for l in range(24)]  # the same on each of the 3 workers
    # The verdict on layer l's outputs is applied before layer l + 2 (one layer late): images dead
    # after l are dropped, those saturated after l parked (layer l + 1 keeps saturation here).
    alive_11, saturated_11 = _alive_and_saturated(ds, biases, 11)
    assert saturated_11 > 0
    assert active[13] == alive_11 - saturated_11     # parked before layer 13
    alive_12, _ = _alive_and_saturated(ds, biases, 12)
    assert active[14] == alive_12                    # every live image is a column at 14: they came back


class Tamper(HubChannel):
    """Worker 0's end: before its first real receive, slip in one crafted chunk."""

    def __init__(self, hub, me, chunk):
        super().__init__(hub, me)
        self.chunk = chunk

    def receive(self, step, timeout):
        if self.chunk is not None:
            chunk, self.chunk = self.chunk, None
            return [chunk] + super().receive(step, timeout)
        return super().receive(step, timeout)


def _two_workers():
    ds = model.synthetic(1024, 8, 60, seed=2)
    net = ds.network.pack()
    return build_shares(net, *ds.images.arrays, partition.contiguous(1024, 8, 2))


#: Images active at layer 1 (what every message of layer 1 must address).
N1 = _two_workers()[0].active.shape[0]


def test_twin_rows_are_extracted_once_and_messages_keep_their_bytes():
    """Outputs with the same weight column and bias (16-32 a group in the official net) are
    extracted once; every message is byte for byte what extracting every row gives."""
    data = model.embedded()
    net = data.network.pack()
    shares = build_shares(net, *data.images.rows(0, 300).arrays, partition.contiguous(1024, 120, 4))
    s, layer = shares[1], 3
    n_out, n = s.out_neurons[layer - 1].shape[0], 300
    colptr, rowidx, vals, _ = net.layer_csc(layer - 1)
    own = np.zeros((n_out + 2, n), np.float32)
    rng = np.random.default_rng(3)
    rows_by_column = {}
    for i, neuron in enumerate(s.out_neurons[layer - 1]):  # what the layer kernel gives twins: equal rows
        key = (rowidx[colptr[neuron]:colptr[neuron + 1]].tobytes(), vals[colptr[neuron]:colptr[neuron + 1]].tobytes())
        row = rows_by_column.setdefault(key, rng.choice(np.float32([0, 0, 0.5, 32]), n))
        own[i] = row
    own[n_out:] = rng.random((2, n)) < 0.3
    peers = [t for t in range(4) if t != 1]  # contiguous ranges: every peer needs some of worker 1's rows
    extracted, subsets = _send_plan(s, layer, peers)
    union = np.union1d(np.concatenate([s.send_pos[layer][t] for t in peers]), [n_out, n_out + 1])
    assert extracted.shape[0] <= len(rows_by_column) + 2 < union.shape[0] // 3  # one row a group of twins
    plain = codec.DenseRows(own, union, n)
    folded = codec.DenseRows(own, extracted, n)
    assert [(t, status) for t, _, status in subsets] == [(0, True), (2, False), (3, False)]  # status: up to the root
    for t, subset, status in subsets:
        rows = np.concatenate([s.send_pos[layer][t], [n_out, n_out + 1] if status else []]).astype(np.int64)
        positions = np.searchsorted(union, rows)
        for max_bytes in (None, 300):
            want = plain.encode(positions, subset.neurons, layer=layer, source=1, target=t, max_bytes=max_bytes)
            assert folded.encode_subset(subset, layer=layer, source=1, target=t, max_bytes=max_bytes) == want


def test_batch_buffers_hand_out_zeros_whether_used_or_grown(monkeypatch):
    # fresh buffers come out dirty here, so a zeros() that skipped its fill would show it
    monkeypatch.setattr(np, "empty", lambda shape, dtype=float: np.full(shape, 7, dtype))
    state = _Batch(np.arange(10), np.arange(0), buffer_rows=4)
    state.prefault(2, 4)
    first = state.zeros(INPUTS, 2, 10)  # zeroed at start-up: handed out as it is
    assert first.shape == (2, 10) and not first.any()
    first[:] = 7
    state.buffer(OUTPUTS, 4, 10)[:] = 5
    assert not state.zeros(INPUTS, 3, 10).any()  # used since: filled again
    fresh = _Batch(np.arange(10), np.arange(0), buffer_rows=4)
    fresh.prefault(2, 2)
    assert not fresh.zeros(INPUTS, 3, 10).any()  # beyond what start-up zeroed: filled
    assert not fresh.zeros(OUTPUTS, 8, 10).any()  # larger than the buffer: a new one, filled


def test_start_up_touches_only_what_the_first_layer_takes():
    """Start-up zeroes the buffers' first-layer part; the rest of the pages wait for a layer that
    needs them (later layers' blocks are mostly narrower: images die or park)."""
    state = _Batch(np.arange(6), np.arange(4), buffer_rows=50)
    state.prefault(3, 5)
    inputs, outputs = state._buffers
    assert inputs.flat.shape == outputs.flat.shape == (500,)   # allocated whole
    assert (inputs.zero_prefix, outputs.zero_prefix) == (30, 50)  # touched: 3 and 5 rows of 10 columns
    assert not inputs.flat[:30].any() and not outputs.flat[:50].any()


def test_another_runs_chunk_is_ignored():
    shares = _two_workers()
    foreign = codec.encode([], [], [], n_images=N1, layer=1, source=1, target=0,
                           run_id=wire_run_id("another-run"))[0]
    hub = Hub(2)
    results, errors = run_threads(shares, [Tamper(hub, 0, foreign), HubChannel(hub, 1)])
    assert not errors and all(results)


@pytest.mark.parametrize("make, match", [
    (lambda: b"\x00" * 100, "worker 0, layer 1: batch 0: malformed chunk"),
    (lambda: codec.encode([5], [0], [1.0], n_images=N1, layer=1, source=0, target=0,
                          run_id=wire_run_id("t"))[0], "misaddressed"),
    # neuron 1 belongs to worker 0: worker 1 must not send it
    (lambda: codec.encode([1], [0], [1.0], n_images=N1, layer=1, source=1, target=0,
                          run_id=wire_run_id("t"))[0], "bad chunk from worker 1"),
    (lambda: codec.encode([600], [0], [1.0], n_images=N1 + 1, layer=1, source=1, target=0,
                          run_id=wire_run_id("t"))[0], "image columns"),
])
def test_hostile_chunks_fail_the_worker_with_worker_and_layer(make, match):
    shares = _two_workers()
    hub = Hub(2)
    results, errors = run_threads(shares, [Tamper(hub, 0, make()), HubChannel(hub, 1)], receive_timeout=2)
    assert any(isinstance(e, WorkerError) and match in str(e) for e in errors), errors


@pytest.mark.parametrize("bad", [{"max_chunk_bytes": 10}, {"max_chunk_bytes": "4096"},
                                 {"connect_timeout": 0}, {"dir": "/nonexistent/fsd"}])
def test_bad_local_channel_configs_are_refused(tmp_path, bad):
    with pytest.raises(ChannelConfigError):
        make_channel({"kind": "local", "dir": str(tmp_path), **bad}, 0, 2, "r")


def test_local_channel_carries_frames_and_refuses_oversized_ones(tmp_path):
    config = {"kind": "local", "dir": str(tmp_path), "max_chunk_bytes": 1024}
    with make_channel(config, 0, 2, "r") as a, make_channel(config, 1, 2, "r") as b:
        a.send(1, [(1, b"x" * 1024), (1, b"")])
        got = []
        while len(got) < 2:
            got += b.receive(1, 5.0)
        assert sorted(got) == [b"", b"x" * 1024]
        with pytest.raises(ChannelError, match="exceeds"):
            a.send(1, [(1, b"y" * 1025)])
        assert b.receive(1, 0.05) == []
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)   # a length field that lies
        hostile.connect(str(tmp_path / "1.sock"))
        hostile.sendall(struct.pack("<I", 1 << 30))
        with pytest.raises(ChannelError, match="exceeds"):
            b.receive(1, 5.0)
        hostile.close()


def test_send_plans_built_when_first_needed_give_the_same_bits(monkeypatch):
    """Plans beyond ``EAGER_PLAN_LAYERS`` are built during the run; force that from layer 3 on."""
    import fsd_runtime.worker as worker_module

    monkeypatch.setattr(worker_module, "EAGER_PLAN_LAYERS", 2)
    ds = model.synthetic(1024, 12, 200, seed=6)
    net = ds.network.pack()
    shares = build_shares(net, *ds.images.arrays, partition.hypergraph(net, 4))
    hub = Hub(4)
    results, errors = run_threads(shares, [HubChannel(hub, p) for p in range(4)])
    assert not errors
    serial = fsd_kernels.infer(*ds.images.arrays, net)
    expected = np.zeros((200, 1024), np.float32)
    expected[np.repeat(np.arange(200), np.diff(serial.indptr)), serial.indices] = serial.data
    np.testing.assert_array_equal(assemble(results, 200, 1024, net.ymax).view(np.uint32), expected.view(np.uint32))
    sent = [r.metrics["layers"][l][r.metrics["fields"].index("messages_sent")] for r in results for l in range(5, 12)]
    assert sum(sent) > 0 and serial.categories.size > 0   # layers with lazily built plans really sent
