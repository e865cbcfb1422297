"""One call for a whole run, serial or distributed: ``fsd_runtime.run(network, images, ...)``.

Accepts networks and images in every form users hold them (a path, a :class:`~fsd_runtime.model.Network`,
an already packed ``fsd_kernels.PackedNetwork``; a path, scipy matrix, ``Csr`` or raw CSR arrays)
and returns the final activations with the categories, so nobody needs to know which layer of the
package does what.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

import fsd_kernels
from fsd_kernels import Activations, PackedNetwork
from fsd_runtime import model

LAUNCHERS = ("fork", "process", "thread")


@dataclass(frozen=True)
class InferenceResult:
    """Final activations (CSR, images x neurons) of a run and where its time went.

    ``timings`` (seconds): ``load_s`` (reading and converting inputs), ``pack_s``, ``run_s``
    (inference; distributed: from all workers ready to all finished) and, for distributed runs,
    the coordinator's own (``startup_s``, ``partition_s``, ...). ``traffic`` (distributed only):
    messages, chunks and bytes the workers sent.
    """

    activations: Activations
    timings: dict[str, float]
    workers: int | None = None
    traffic: dict | None = field(default=None)

    @property
    def categories(self) -> np.ndarray:
        """0-based ids of the images whose final row is nonzero."""
        return self.activations.categories

    @property
    def shape(self) -> tuple[int, int]:
        return self.activations.indptr.shape[0] - 1, self.activations.n_neurons

    def to_scipy(self):
        """The final activations as a ``scipy.sparse.csr_matrix`` (scipy imported only here)."""
        import scipy.sparse

        a = self.activations
        return scipy.sparse.csr_matrix((a.data, a.indices, a.indptr), shape=self.shape)


def as_packed(network, bias: float | None = None) -> PackedNetwork:
    """A packed network from a path (directory or .npz), a ``Network`` or a ``PackedNetwork``."""
    if isinstance(network, PackedNetwork):
        if bias is not None:
            raise ValueError("bias applies to network directories, not to a packed network")
        return network
    if isinstance(network, (str, os.PathLike)):
        network = model.load_network(os.fspath(network), bias)
    elif bias is not None:
        raise ValueError("bias applies to network directories; a Network carries its own biases")
    if not isinstance(network, model.Network):
        raise TypeError(f"network must be a path, a Network or a PackedNetwork, got {type(network).__name__}")
    return network.pack()


def _launcher_config(launcher) -> dict:
    """A launcher config from a kind or a config; None: fork where the OS can, else process."""
    if launcher is None:
        launcher = "fork" if hasattr(os, "fork") else "process"
    config = {"kind": launcher} if isinstance(launcher, str) else dict(launcher)
    if config.get("kind") not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS} (or a launcher config), got {launcher!r}")
    return config


def run(network, images, *, workers: int | None = None, partition: str | None = None,
        batch_size: int | None = None, threads: int | None = None, launcher: str | dict | None = None,
        channel="local", bias: float | None = None, fanout: int = 2,
        receive_timeout: float | None = None, run_timeout: float | None = None,
        metrics_dir: str | None = None, prepared=None) -> InferenceResult:
    """Run ``images`` through ``network``: serially in this process (``workers=None``, kernel
    ``threads``), or on ``workers`` local workers (``launcher`` "fork", "process" or "thread";
    default fork where the OS can, else process; the local channel, neurons split by
    ``partition``, default hypergraph). Both give bit-identical activations. Timeouts: derived
    from the work unless given.

    ``network``: a directory of official layer files or an .npz file (see docs/formats.md), a
    :class:`~fsd_runtime.model.Network` or an ``fsd_kernels.PackedNetwork``; ``bias`` is the
    scalar bias for a directory without a bias file. ``images``: an official input file, a scipy
    sparse matrix, a ``Csr`` or ``(indptr, indices, data)``, images x neurons.

    ``prepared``: a directory made by ``fsd_runtime.prepared.prepare`` (``fsd-inference
    prepare``): a distributed run on its workers (``workers``, default the model's) without
    partitioning or planning. ``network`` may then be None; if given (any form above, read one
    layer at a time), it must be the network the model was prepared from.
    """
    timings = {}
    if prepared is not None:
        return _run_prepared(network, images, prepared, timings, workers=workers, partition=partition,
                             batch_size=batch_size, threads=threads, launcher=launcher, channel=channel,
                             bias=bias, fanout=fanout, receive_timeout=receive_timeout,
                             run_timeout=run_timeout, metrics_dir=metrics_dir)
    start = time.perf_counter()
    net = as_packed(network, bias)
    timings["pack_s"] = time.perf_counter() - start
    start = time.perf_counter()
    x = model.as_images(images, net.n_neurons)
    timings["load_s"] = time.perf_counter() - start
    if workers is None:
        start = time.perf_counter()
        out = fsd_kernels.infer(*x.arrays, net, batch_size=batch_size, threads=threads)
        timings["run_s"] = time.perf_counter() - start
        return InferenceResult(out, timings)
    if threads is not None:
        raise ValueError("threads applies to serial runs; a distributed worker runs one kernel thread")
    from fsd_runtime.coordinator import run_distributed

    channel_config = {"kind": channel} if isinstance(channel, str) else dict(channel)
    result = run_distributed(net, x.arrays, workers, partition=partition or "hypergraph", channel=channel_config,
                             launcher=_launcher_config(launcher), fanout=fanout, batch_size=batch_size,
                             receive_timeout=receive_timeout, run_timeout=run_timeout,
                             metrics_dir=metrics_dir)
    timings.update(result.timings)
    return InferenceResult(result.activations, timings, workers, result.traffic)


def _run_prepared(network, images, prepared, timings, *, workers, partition, batch_size, threads, launcher,
                  channel, bias, fanout, receive_timeout, run_timeout, metrics_dir) -> InferenceResult:
    from fsd_runtime import prepared as prep
    from fsd_runtime.coordinator import run_distributed

    if threads is not None:
        raise ValueError("threads applies to serial runs; a prepared model runs on its workers")
    start = time.perf_counter()
    found = prep.open_model(prepared)
    prep.check_model(found, n_workers=workers, partition=partition)
    if network is not None:
        prep.check_model(found, network_hash=prep.network_hash(network, bias))
    elif bias is not None:
        raise ValueError("bias applies to a network directory; a prepared model holds its own biases")
    timings["pack_s"] = time.perf_counter() - start
    start = time.perf_counter()
    x = model.as_images(images, found.n_neurons)
    timings["load_s"] = time.perf_counter() - start
    channel_config = {"kind": channel} if isinstance(channel, str) else dict(channel)
    result = run_distributed(None, x.arrays, found.n_workers, prepared=found, channel=channel_config,
                             launcher=_launcher_config(launcher), fanout=fanout, batch_size=batch_size,
                             receive_timeout=receive_timeout, run_timeout=run_timeout,
                             metrics_dir=metrics_dir)
    timings.update(result.timings)
    return InferenceResult(result.activations, timings, found.n_workers, result.traffic)
