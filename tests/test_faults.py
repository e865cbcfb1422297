"""Faults: a channel that duplicates, reorders and delays changes nothing; a hung or dead worker
fails the run within its timeout, naming worker and layer, and leaves no process behind."""
import os
import random
import signal
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

import fsd_kernels
from fsd_kernels import codec
from fsd_runtime import model
from fsd_runtime.channels import register_channel
from fsd_runtime.channels.local import LocalChannel
from fsd_runtime.coordinator import RunError, run_distributed
from fsd_runtime.worker import wire_run_id

from proc_helpers import processes_with_marker


class ChaosChannel(LocalChannel):
    """LocalChannel that sends some chunks twice, holds some back for a later receive, hands
    them out shuffled and duplicated, and slips in another run's chunk now and then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(self.worker_id)
        self.held: list[bytes] = []
        self.stats = {"duplicated": 0, "held": 0, "foreign": 0}

    def send(self, step, chunks):
        chunks = list(chunks)
        doubled = [c for c in chunks if self.rng.random() < 0.3]
        self.stats["duplicated"] += len(doubled)
        self.rng.shuffle(chunks)
        super().send(step, chunks + doubled)

    def receive(self, step, timeout):
        time.sleep(self.rng.random() * 0.002)
        items = self.held + super().receive(step, 0.0 if self.held else timeout)
        self.rng.shuffle(items)
        keep = len(items) // 3
        self.held, items = items[:keep], items[keep:]
        self.stats["held"] += keep
        items += [c for c in items if self.rng.random() < 0.3]
        if self.rng.random() < 0.2:
            self.stats["foreign"] += 1
            items.insert(0, codec.encode([], [], [], n_images=1, layer=1, source=0, target=self.worker_id,
                                         run_id=wire_run_id("some-other-run"))[0])
        return items


class HangingChannel(LocalChannel):
    """Worker 2 hangs in its send of layer 3 until the test releases it."""

    release = threading.Event()

    def send(self, step, chunks):
        if self.worker_id == 2 and codec.decode_header(chunks[0][1]).layer == 3:
            self.release.wait(120)
            return
        super().send(step, chunks)


register_channel("chaos", ChaosChannel)
register_channel("hanging", HangingChannel)


@pytest.fixture(scope="module")
def net_and_serial():
    ds = model.synthetic(1024, 30, 300, seed=11)
    net = ds.network.pack()
    return ds, net, fsd_kernels.infer(*ds.images.arrays, net)


def test_duplicated_reordered_delayed_and_foreign_chunks_change_nothing(net_and_serial):
    ds, net, serial = net_and_serial
    result = run_distributed(net, ds.images.arrays, 4, channel={"kind": "chaos", "max_chunk_bytes": 300},
                             launcher={"kind": "thread"}, batch_size=120, receive_timeout=30)
    got = result.activations
    np.testing.assert_array_equal(got.indptr, serial.indptr)
    np.testing.assert_array_equal(got.indices, serial.indices)
    np.testing.assert_array_equal(got.data.view(np.uint32), serial.data.view(np.uint32))
    totals = {f: sum(r[f] for r in result.metrics) for f in ("duplicates", "chunks_received", "chunks_sent")}
    assert totals["duplicates"] > 0                           # the faults really happened
    assert totals["chunks_received"] == totals["chunks_sent"]  # and each chunk was used once


def test_a_hung_worker_fails_the_run_within_the_timeout_naming_worker_and_layer(net_and_serial):
    ds, net, _ = net_and_serial
    start = time.monotonic()
    try:
        with pytest.raises(RunError, match=r"layer 3: batch 0: no complete message from worker\(s\) \[2\]"):
            run_distributed(net, ds.images.arrays, 3, channel={"kind": "hanging"},
                            launcher={"kind": "thread"}, receive_timeout=2, run_timeout=60)
    finally:
        HangingChannel.release.set()
    assert time.monotonic() - start < 30
    for thread in threading.enumerate():  # the released worker fails on; it must not re-create the store
        if thread.name.startswith("fsd-worker-"):
            thread.join(30)
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("fsd-")]


_processes_with_marker = processes_with_marker


def _loading_kernels(pid: int) -> bool:
    """The worker has read its event and started its children: it is importing the kernels."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return False
    return "numba" in maps or "fsd_kernels/_native" in maps


def test_a_killed_worker_process_fails_the_run_and_leaves_no_orphans(net_and_serial, monkeypatch):
    ds, net, _ = net_and_serial
    marker = uuid.uuid4().hex
    monkeypatch.setenv("FSD_TEST_MARKER", marker)
    outcome = {}

    def run():
        try:
            run_distributed(net, ds.images.arrays, 3, launcher={"kind": "process"}, receive_timeout=5,
                            channel={"kind": "local", "connect_timeout": 5}, run_timeout=300)
        except RunError as exc:
            outcome["error"] = str(exc)
    coordinator = threading.Thread(target=run)
    coordinator.start()
    deadline = time.monotonic() + 200
    killed = None
    while killed is None and time.monotonic() < deadline:
        workers = _processes_with_marker(marker)
        if len(workers) >= 3 and _loading_kernels(max(workers)):
            killed = max(workers)    # a leaf of the tree that has read its event and runs
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    coordinator.join(300)
    assert killed is not None and not coordinator.is_alive()
    assert "distributed run failed" in outcome.get("error", "")
    assert "died during start-up" in outcome["error"] or "died at layer" in outcome["error"]
    time.sleep(0.2)
    assert _processes_with_marker(marker) == []


def test_an_interrupt_during_a_share_upload_lets_it_finish_before_the_clean_up(net_and_serial, tmp_path):
    """SIGINT while the coordinator uploads a share: a request already sent may be stored by
    the server after a clean-up that does not wait for it (seen on the S3 store: the share
    stayed). The upload under way ends first; then the interrupt, then the clean-up."""
    from fsd_runtime.storage import LocalStorage

    ds, net, _ = net_and_serial
    landed = []

    class SlowServer(LocalStorage):
        """The object is stored by a "server" thread shortly after the request went out."""

        def put(self, key, data):
            if "/shares/" not in key or landed:
                return super().put(key, data)
            server = threading.Thread(target=lambda: (time.sleep(0.3), super(SlowServer, self).put(key, data),
                                                      landed.append(key)))
            server.start()
            os.kill(os.getpid(), signal.SIGINT)
            server.join()  # the answer

    store = SlowServer(str(tmp_path / "store"))
    with pytest.raises(KeyboardInterrupt):
        run_distributed(net, ds.images.arrays, 2, launcher={"kind": "thread"}, storage=store)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(10)
    assert landed and store.list("runs") == []
