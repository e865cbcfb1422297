"""The launch tree and the local process launcher: every worker starts once, nothing outlives a run."""
import os
import signal
import time

import pytest

from fsd_runtime.worker import ForkLauncher
from fsd_runtime import events as ev
from fsd_runtime import launch, model, partition
from fsd_runtime.channels.local import LocalChannel
from fsd_runtime.plan import build_shares
from fsd_runtime.storage import LocalStorage


@pytest.mark.parametrize("fanout", [1, 2, 3, 7])
@pytest.mark.parametrize("n_workers", [1, 2, 5, 8, 31])
def test_tree_reaches_every_worker_exactly_once(n_workers, fanout):
    if fanout == 1 and n_workers > launch.MAX_TREE_DEPTH:
        pytest.skip("too deep by design")
    seen, frontier, depth = [0], [0], 1
    while frontier:
        frontier = [c for w in frontier for c in launch.tree_children(w, n_workers, fanout)]
        seen += frontier
        depth += bool(frontier)
    assert sorted(seen) == list(range(n_workers))
    assert depth == launch.tree_depth(n_workers, fanout)


@pytest.mark.parametrize("args", [(-1, 4, 2), (4, 4, 2), (0, 4, 0), (0, 100, 1), (0, 4, True)])
def test_bad_trees_are_refused(args):
    worker, n_workers, fanout = args
    with pytest.raises(launch.LaunchError):
        launch.tree_children(worker, n_workers, fanout)


def test_unknown_launcher_kind_is_refused():
    with pytest.raises(launch.LaunchError, match="unknown launcher kind"):
        launch.make_launcher({"kind": "teleport"})


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.mark.parametrize("kind", ["process", "fork"])
def test_tree_launch_of_processes_leaves_no_orphans_when_a_worker_is_killed(tmp_path, kind):
    """Workers 0..3 start as a tree of processes; worker 3's share is missing so it fails at once
    and the others block waiting for it. Killing one of them and then closing the launcher must
    leave no process of the tree alive."""
    ds = model.synthetic(128, 6, 50, seed=1)
    net = ds.network.pack()
    shares = build_shares(net, *ds.images.arrays, partition.contiguous(128, 6, 4))
    storage = LocalStorage(str(tmp_path / "store"))
    prefix = "runs/orphans"
    for share in shares[:3]:
        storage.put(ev.share_key(prefix, share.worker), share.to_bytes())
    channel = LocalChannel.create_run({"kind": "local"}, "orphans", 4)
    event = ev.WorkerEvent(run_id="orphans", worker_id=0, n_workers=4, fanout=2,
                           storage=storage.config(), prefix=prefix, channel=channel,
                           launcher={"kind": kind}, receive_timeout=120)
    launcher = launch.ProcessLauncher(own_group=True) if kind == "process" else ForkLauncher(own_group=True)
    try:
        launcher.launch([event])
        root = launcher._procs[0].pid
        deadline = time.monotonic() + 120
        while not (storage.exists(ev.error_key(prefix, 3))
                   and all(os.path.exists(os.path.join(channel["dir"], f"{w}.sock")) for w in range(3))):
            assert time.monotonic() < deadline, "the tree did not start"
            time.sleep(0.05)
        assert "no stored object" in storage.get(ev.error_key(prefix, 3)).decode()
        members = _group_members(root)
        assert len(members) >= 3
        os.kill(max(members), signal.SIGKILL)           # a worker dies mid-run
    finally:
        launcher.close()
        LocalChannel.delete_run(channel, "orphans", 4)
    time.sleep(0.2)
    assert _group_members(root) == []


def test_a_launched_worker_writes_to_its_own_stderr_file_from_its_start(tmp_path, capfd):
    """A worker process's first lines (the handler's "worker starting") went to its launcher's
    stderr, so a crash report could quote another worker's line as the dead worker's."""
    from fsd_runtime import liveness
    from fsd_runtime.aws.invokers import LocalInvoker

    record = liveness.RunRecord("run1", base=str(tmp_path))  # held, as a coordinator holds it
    event = ev.WorkerEvent(
        run_id="run1", worker_id=3, n_workers=4, fanout=2,
        storage={"kind": "local", "root": str(tmp_path / "store")}, prefix="runs/run1",
        channel={"kind": "local", "dir": str(tmp_path)}, launcher={"kind": "local"},
        receive_timeout=5.0, run_timeout=30.0, launch_children=False)
    launcher = LocalInvoker()  # worker processes running the Lambda handler, which logs first
    launcher.env = record.env()
    launcher.stderr_for = liveness.open_worker_stderr  # as the coordinator and tree parents set it
    try:
        launcher.launch([event])
        deadline = time.monotonic() + 60
        while launcher._procs[3].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # it fails soon: its run has no share for it
        said = open(os.path.join(record.dir, "workers", "3.err")).read()
    finally:
        launcher.close()
        record.close()
    assert "worker starting" in said and "no share for worker 3" in said
    assert "worker starting" not in capfd.readouterr().err
