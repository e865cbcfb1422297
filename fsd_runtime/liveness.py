"""Run records: a local coordinator and its worker processes see each other die, and nothing of a
dead run stays behind.

Every run of the coordinator makes a record directory ``$TMPDIR/fsd-run-<id>-*`` holding

* ``lock``: ``flock``-ed (exclusive) by the coordinator for the run's whole life; the kernel
  releases it however the coordinator ends, SIGKILL included;
* ``run.json``: what to remove if the coordinator dies (local paths, channel and store configs);
* ``store/``: the run's local store (shares, results, errors), when the coordinator owns it;
* ``workers/W``: worker W's beacon (its pid and current layer), ``flock``-ed by the worker
  process, and ``workers/W.err``, its stderr.

Worker processes find the record through ``$FSD_RUN_RECORD`` (set by the coordinator's
launcher, inherited down the launch tree). A worker's watcher thread polls the coordinator's
lock every :data:`WATCH_SECONDS`: once it can take it, the coordinator is gone, and the worker
removes the run's local files and exits. The coordinator polls the beacons: a beacon whose lock
is free belongs to a worker process that has ended, so a worker that dies is reported, by id and
layer, within a poll (start-up never counts: a worker has a beacon only once it runs). A lock
proves liveness without pids, so pid reuse cannot fool it. :func:`sweep` removes what runs whose
coordinator died left (every run sweeps local leftovers first; ``fsd-inference clean`` also
deletes AWS leftovers).

Only the standard library: worker processes import this before anything else.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

ENV = "FSD_RUN_RECORD"
PREFIX = "fsd-run-"
#: How often a worker checks its coordinator (seconds).
WATCH_SECONDS = 0.5
#: Exit status of a worker process that found its coordinator gone.
ORPHAN_EXIT = 3
_BEACON = struct.Struct("<qq")  # pid, layer (-1: starting)
#: A record without run.json older than this is a coordinator that died while creating it.
_STALE_SECONDS = 600


def _free(path: str) -> bool:
    """Whether nobody holds the lock on ``path`` (a missing file counts as free)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also releases the lock if we took it
    return True


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block ends (a run's clean-up is never cut short; the
    signal is handled right after). Blocking them in this thread is not enough where the
    process has other threads (the kernels' own): the kernel hands the signal to one of those,
    and Python still runs its handler in the main thread. So the main thread's handlers only
    note it here, and the first noted signal is raised again once the block is done. Handlers
    are swapped inside the ``try`` and put back one ``finally`` each, so a signal landing
    midway never leaves one noting forever."""
    signals = (signal.SIGINT, signal.SIGTERM)
    noted: list[int] = []
    saved: dict = {}
    old = None
    try:
        if hasattr(signal, "pthread_sigmask"):
            old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                if signal.getsignal(signum) is not None:  # (None: set outside Python, cannot be put back)
                    saved[signum] = signal.signal(signum, lambda signum, frame: noted.append(signum))
        yield
    finally:
        try:
            _put_back(list(saved.items()))
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if noted:
            signal.raise_signal(noted[0])


def _put_back(handlers: list) -> None:
    """Each ``(signum, handler)`` back in place, even if one put back first raises meanwhile."""
    if handlers:
        try:
            signal.signal(*handlers[0])
        finally:
            _put_back(handlers[1:])


class RunRecord:
    """The coordinator's side: create, describe, poll the workers, remove."""

    def __init__(self, run_id: str, base: str | None = None):
        self.dir = tempfile.mkdtemp(prefix=f"{PREFIX}{run_id[:8]}-", dir=base)
        self._lock = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.mkdir(os.path.join(self.dir, "workers"))
        self.info = {"run_id": run_id, "pid": os.getpid(), "paths": [], "channel": None,
                     "storage": None, "prefix": None, "n_workers": 0}
        self.update()

    @property
    def store_dir(self) -> str:
        return os.path.join(self.dir, "store")

    def update(self, **info) -> None:
        """Record more of what the run has created (written before the next step creates more)."""
        self.info.update(info)
        _write_json(os.path.join(self.dir, "run.json"), self.info)

    def env(self) -> dict:
        return {ENV: self.dir}

    def dead_workers(self) -> dict[int, int]:
        """Workers whose process ended: worker id -> the layer it was at (-1: starting)."""
        dead = {}
        workers = os.path.join(self.dir, "workers")
        for name in os.listdir(workers):
            if not name.isdigit():
                continue
            path = os.path.join(workers, name)
            if _free(path):
                try:
                    with open(path, "rb") as f:
                        _, layer = _BEACON.unpack(f.read(_BEACON.size))
                except (OSError, struct.error):
                    layer = -1
                dead[int(name)] = layer
        return dead

    def worker_stderr(self, worker: int, limit: int = 400) -> str:
        """The last line a worker wrote to its stderr ('' if none)."""
        try:
            with open(os.path.join(self.dir, "workers", f"{worker}.err"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = [s for s in f.read().decode("utf-8", "replace").splitlines() if s.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:limit] if lines else ""

    def close(self) -> None:
        """Remove the record (and the store inside it), then release the lock."""
        for path in self.info.get("paths", []):
            shutil.rmtree(path, ignore_errors=True)
        _discard(self.dir)
        os.close(self._lock)


class Beacon:
    """A worker process's side: its beacon, stderr capture and the watcher of its coordinator."""

    def __init__(self, record: str, worker: int):
        self.record = record
        self.pid = os.getpid()
        path = os.path.join(record, "workers", str(worker))
        # Locked before it is visible: the coordinator takes a beacon it can lock for a dead
        # worker, so a beacon created under its own name and locked a moment later could be seen
        # free in between (a live worker reported "died during start-up", under load). The lock
        # belongs to the open file, which the rename keeps.
        staging = f"{path}.{self.pid}.new"
        self.fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.layer(-1)
        os.rename(staging, path)

    def layer(self, layer: int) -> None:
        os.pwrite(self.fd, _BEACON.pack(self.pid, layer), 0)


def open_worker_stderr(worker: int, environ=None) -> int | None:
    """A descriptor appending to ``worker``'s stderr file in the run record the environment names
    (None: no record). A launcher hands it to the worker process from its start, so nothing the
    worker writes lands in its parent's file."""
    record = (os.environ if environ is None else environ).get(ENV)
    if not record or not os.path.isdir(os.path.join(record, "workers")):
        return None
    try:
        return os.open(os.path.join(record, "workers", f"{worker}.err"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        return None


#: This process's beacon (a forked worker finds its tree parent's here).
_beacon: Beacon | None = None
#: Held by the watcher while it removes the files of a run whose coordinator died: the worker
#: process takes it before it ends (:func:`before_exit`), so its own end never cuts that short.
_removing = threading.Lock()


def start_worker(worker: int) -> Beacon | None:
    """In a worker process launched by a local coordinator: send stderr to the record, start the
    beacon and the watcher. Returns None when there is no record (threads, Lambda, tests)."""
    global _beacon, _removing
    _removing = threading.Lock()  # forked while the parent's watcher held it: not this process's
    if _beacon is not None and _beacon.pid != os.getpid():
        # forked from a worker: its beacon's descriptor, and so its lock, came along; held here,
        # that worker's death would never free its beacon and go unseen by the coordinator
        os.close(_beacon.fd)
        _beacon = None
    record = os.environ.get(ENV)
    err = open_worker_stderr(worker)
    if err is None:
        return None
    try:
        os.dup2(err, 2)
        os.close(err)
        beacon = _beacon = Beacon(record, worker)
    except OSError:
        return None
    threading.Thread(target=_watch, args=(record,), name="fsd-coordinator-watch", daemon=True).start()
    return beacon


def before_exit(timeout: float = 30.0) -> None:
    """In a worker process about to end: if its watcher is removing the run's files (the
    coordinator died), wait until it is done (the watcher then ends the process)."""
    _removing.acquire(timeout=timeout)


def _watch(record: str) -> None:
    lock = os.path.join(record, "lock")
    while not _free(lock):
        time.sleep(WATCH_SECONDS)
    try:
        with open(os.path.join(record, "run.json")) as f:
            local = _is_local(json.load(f))
    except (OSError, ValueError):
        local = True
    _removing.acquire()  # (never released: the process ends here, or is ending already)
    if local:  # an AWS run's record stays for `fsd-inference clean` (or its next run) to finish
        _remove_local(record)
    print("fsd_runtime.worker: the coordinator is gone; exiting", file=sys.stderr, flush=True)
    os._exit(ORPHAN_EXIT)


def _remove_local(record: str) -> None:
    try:
        with open(os.path.join(record, "run.json")) as f:
            paths = json.load(f).get("paths", [])
    except (OSError, ValueError):
        paths = []
    for path in paths if isinstance(paths, list) else []:
        if isinstance(path, str) and os.path.basename(path).startswith("fsd-"):
            shutil.rmtree(path, ignore_errors=True)
    _discard(record)


def _discard(record: str) -> None:
    """Remove a record, moved aside first: workers of the run may still write into its store
    (their error records) while it is removed, and a file or directory made inside a tree being
    removed stays behind; once moved, their writes fail (the store never re-creates its root).
    What a remover killed meanwhile leaves has a name :func:`sweep` removes at once."""
    gone = f"{record}.gone-{os.getpid()}"
    try:
        os.rename(record, gone)
    except FileNotFoundError:
        return  # another process of the run is removing it
    except OSError:
        gone = record
    shutil.rmtree(gone, ignore_errors=True)


def _being_removed(name: str, record: str) -> bool:
    """Whether a record moved aside by :func:`_discard` is still being removed: its remover lives
    and the record changed lately (a long-lived process that took a dead remover's pid does not
    keep the record forever)."""
    pid = name.rpartition(".gone-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        pass  # alive, another user's
    except (OSError, OverflowError):
        return False  # no such process (or no pid at all)
    try:
        return time.time() - os.path.getmtime(record) < _STALE_SECONDS
    except OSError:
        return True  # gone meanwhile: its remover finished


def _is_local(info: dict) -> bool:
    channel, storage = info.get("channel") or {}, info.get("storage") or {}
    return channel.get("kind", "local") == "local" and storage.get("kind", "local") == "local"


def sweep(base: str | None = None, *, aws: bool = False) -> list[str]:
    """Remove what dead runs left in ``base`` (default: $TMPDIR): their records, local stores
    and socket directories, and with ``aws=True`` their queues, subscriptions and S3 objects.
    Runs whose coordinator lives are never touched. Returns what was removed, one line each."""
    base = base or tempfile.gettempdir()
    removed = []
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith(PREFIX))
    except OSError:
        return removed
    for name in names:
        record = os.path.join(base, name)
        if ".gone-" in name and _being_removed(name, record):
            continue
        if not _free(os.path.join(record, "lock")):
            continue
        try:
            with open(os.path.join(record, "run.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            try:  # (one moved aside by a remover is not being created: see _discard)
                if ".gone-" not in name and time.time() - os.path.getmtime(record) < _STALE_SECONDS:
                    continue  # a coordinator may be creating it right now
            except OSError:
                continue
            info = {}
        if not _is_local(info):
            if not aws:
                continue
            try:
                _remove_aws(info)
            except Exception as exc:  # noqa: BLE001 (kept for the next try, said once)
                removed.append(f"could not remove AWS leftovers of run {info.get('run_id')}: {exc}")
                continue
        _remove_local(record)
        removed.append(f"removed leftovers of dead run {info.get('run_id', name)} ({record})")
    return removed


def _remove_aws(info: dict) -> None:
    from fsd_runtime.channels import channel_class
    from fsd_runtime.storage import make_storage

    run_id, n = info.get("run_id"), int(info.get("n_workers") or 0)
    if info.get("channel"):
        channel_class(info["channel"]).delete_run(info["channel"], run_id, n)
    if info.get("storage") and info.get("prefix"):
        make_storage(info["storage"]).delete_prefix(info["prefix"])
