"""Starting workers: the deterministic launch tree and the launchers that start one worker.

The paper's hierarchical launch: the coordinator starts worker 0, and every
worker starts its own children before doing anything else, so P workers
are running after about log_k(P) launch latencies instead of P. The tree
is a k-ary heap over worker ids (children of w are w*k+1 .. w*k+k), so any
worker count works and every worker computes its children from its event
alone.

A :class:`Launcher` starts workers from their events, asynchronously (like
Lambda's ``InvocationType='Event'``). Kinds: ``process`` (a local
``python -m fsd_runtime.worker`` per worker, the event on stdin),
``thread`` (in this process, for tests and debugging; ``fsd_runtime.worker.ThreadLauncher``); the AWS adapters
register ``lambda`` and ``rie`` with :func:`register_launcher`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from typing import Callable, Mapping, Sequence

from fsd_runtime.events import WorkerEvent
from fsd_runtime.kinds import Registry

#: A tree deeper than this would make the last worker wait for too many launch hops.
MAX_TREE_DEPTH = 32


class LaunchError(ValueError):
    """A bad tree shape or launcher config, or a worker that could not be started."""


def tree_depth(n_workers: int, fanout: int) -> int:
    """Launch hops from the coordinator to the deepest worker (1 for a lone worker)."""
    _check_tree(n_workers, fanout)
    depth, first, width = 1, 0, 1
    while first + width < n_workers:
        first, width, depth = first + width, width * fanout, depth + 1
    return depth


def _check_tree(n_workers: int, fanout: int) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise LaunchError(f"n_workers must be a positive integer, got {n_workers!r}")
    if isinstance(fanout, bool) or not isinstance(fanout, int) or fanout < 1:
        raise LaunchError(f"fan-out must be a positive integer, got {fanout!r}")
    if fanout == 1 and n_workers > MAX_TREE_DEPTH:
        raise LaunchError(f"fan-out 1 with {n_workers} workers is a chain deeper than {MAX_TREE_DEPTH}")


def tree_children(worker: int, n_workers: int, fanout: int) -> list[int]:
    """The workers ``worker`` starts: ``worker*fanout + 1 .. worker*fanout + fanout`` below n_workers."""
    _check_tree(n_workers, fanout)
    if tree_depth(n_workers, fanout) > MAX_TREE_DEPTH:
        raise LaunchError(f"a tree of {n_workers} workers with fan-out {fanout} is deeper than {MAX_TREE_DEPTH}")
    if isinstance(worker, bool) or not isinstance(worker, int) or not 0 <= worker < n_workers:
        raise LaunchError(f"worker must be in 0..{n_workers - 1}, got {worker!r}")
    first = worker * fanout + 1
    return list(range(first, min(first + fanout, n_workers)))


class Launcher(ABC):
    """Starts workers from their events without waiting for them to finish."""

    @abstractmethod
    def launch(self, events: Sequence[WorkerEvent]) -> None:
        """Start one worker per event; raise :class:`LaunchError` if one cannot be started."""

    def failures(self) -> dict[int, str]:
        """Workers this launcher started that have already failed: worker id -> reason."""
        return {}

    def close(self) -> None:
        """Stop whatever this launcher started that still runs (a coordinator's clean-up)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProcessLauncher(Launcher):
    """One local process per worker: ``python -m fsd_runtime.worker``, the event JSON on stdin.

    ``own_group=True`` (the coordinator's launcher) puts each started worker
    in a new process group that its tree children join, and :meth:`close`
    kills those whole groups: no worker outlives the run, even when a
    parent dies before its children.
    """

    #: The module each worker process runs (``python -m``); it reads the event JSON on stdin.
    entry_module = "fsd_runtime.worker"

    def __init__(self, config: Mapping | None = None, *, own_group: bool = False):
        self.config = dict(config or {"kind": "process"})
        self.own_group = own_group
        #: Variables added to the workers' environment (the coordinator's run record).
        self.env: dict[str, str] = {}
        #: ``(worker, environment) -> descriptor or None``: the stderr a worker process starts
        #: with (``liveness.open_worker_stderr``: its own file in the run record); None: ours.
        self.stderr_for: Callable[[int, Mapping[str, str]], int | None] | None = None
        self._procs: dict[int, subprocess.Popen] = {}

    def launch(self, events: Sequence[WorkerEvent]) -> None:
        for event in events:
            env = {**os.environ, **self.env}
            err = self.stderr_for(event.worker_id, env) if self.stderr_for else None
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", self.entry_module], stdin=subprocess.PIPE, stderr=err,
                    start_new_session=self.own_group, env=env)
                proc.stdin.write(event.to_json().encode())
                proc.stdin.close()
            except OSError as exc:
                raise LaunchError(f"cannot start worker {event.worker_id}: {exc}") from exc
            finally:
                if err is not None:
                    os.close(err)
            self._procs[event.worker_id] = proc

    def failures(self) -> dict[int, str]:
        return {w: f"process exited with status {p.returncode}"
                for w, p in self._procs.items() if p.poll() not in (None, 0)}

    def close(self) -> None:
        for proc in self._procs.values():
            if self.own_group:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            elif proc.poll() is None:
                proc.kill()
            proc.wait()
        self._procs.clear()


#: ``thread`` and ``fork`` live in fsd_runtime.worker (they run the worker loop), named by path
#: so that this module never imports the worker (which imports this one).
_KINDS = Registry("launcher", LaunchError, {"process": ProcessLauncher,
                                             "thread": "fsd_runtime.worker:ThreadLauncher",
                                             "fork": "fsd_runtime.worker:ForkLauncher"})


def register_launcher(kind: str, factory: Callable[[Mapping], Launcher] | str) -> None:
    """Add a launcher kind: a factory taking the config dict, or a ``"module:attribute"`` path to one."""
    _KINDS.register(kind, factory)


def make_launcher(config: Mapping) -> Launcher:
    """The launcher a config names, e.g. ``{"kind": "process"}`` (a worker's, for its children)."""
    return _KINDS.resolve(config)(config)


def launch_children(event: WorkerEvent, launcher: Launcher) -> list[int]:
    """Start ``event``'s tree children (if it launches any); return their ids."""
    if not event.launch_children:
        return []
    children = tree_children(event.worker_id, event.n_workers, event.fanout)
    launcher.launch([event.for_worker(c) for c in children])
    return children
