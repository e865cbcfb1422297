"""Per-worker, per-layer counters and timers; merged at the coordinator into JSON, CSV and a plot.

Bytes are encoded chunk bytes (what crosses the wire); ``rows_*`` count
activation rows (one neuron over a batch's images) and ``nnz_*`` their
nonzeros. ``*_s`` times are seconds of wall clock spent in each phase; ``*_cpu_s`` the CPU
time of the worker's thread in the busy ones (what a worker with a core of its own would take:
on a machine running more workers than cores, wall clock also counts waiting for a core).
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np

FIELDS = ("messages_sent", "chunks_sent", "bytes_sent", "rows_sent", "nnz_sent",
          "messages_received", "chunks_received", "bytes_received", "rows_received", "nnz_received",
          "duplicates", "images_active", "status_only_sent", "compute_s", "wait_s", "encode_s", "decode_s",
          "compute_cpu_s", "encode_cpu_s", "decode_cpu_s")
_INDEX = {name: i for i, name in enumerate(FIELDS)}


#: Per layer and target worker: what this worker sent that target.
PAIR_FIELDS = ("rows", "nnz", "bytes")


class LayerMetrics:
    """One worker's counters, one row per layer, plus what it sent each target per layer."""

    def __init__(self, worker: int, n_layers: int, n_workers: int = 1):
        self.worker = worker
        self.table = np.zeros((n_layers, len(FIELDS)), np.float64)
        self.pairs = np.zeros((n_layers, n_workers, len(PAIR_FIELDS)), np.int64)
        #: One ``(step, target, bytes)`` per chunk sent, in send order: what a channel's billing
        #: (SNS batches, S3 objects and ranged reads) depends on (bench/paper.py prices it).
        self.chunk_log: list[tuple[int, int, int]] = []

    def log_chunks(self, step: int, chunks) -> None:
        """Record one ``Channel.send`` call's ``(target, chunk)`` list."""
        self.chunk_log.extend((step, int(t), len(c)) for t, c in chunks)

    def add(self, layer: int, field: str, value: float) -> None:
        self.table[layer, _INDEX[field]] += value

    def add_sent(self, layer: int, targets: list[int], sent: np.ndarray) -> None:
        """One layer's messages, one per target: ``sent[i]`` = (rows, nnz, bytes, chunks) sent
        ``targets[i]`` (one call a layer, not five a message)."""
        rows, nnz, nbytes, chunks = sent.sum(axis=0).tolist()
        row = self.table[layer]
        for field, value in (("messages_sent", len(targets)), ("chunks_sent", chunks), ("bytes_sent", nbytes),
                             ("rows_sent", rows), ("nnz_sent", nnz)):
            row[_INDEX[field]] += value
        self.pairs[layer, targets] += sent[:, :3]

    def to_dict(self) -> dict:
        return {"worker": self.worker, "fields": list(FIELDS), "layers": self.table.tolist(),
                "pair_fields": list(PAIR_FIELDS), "pairs": self.pairs.tolist(), "chunk_log": self.chunk_log}


def merge_pairs(worker_metrics: list[dict]) -> list[dict]:
    """Rows ``{layer, source, target, rows, nnz, bytes}`` for every pair that exchanged rows."""
    out = []
    for m in worker_metrics:
        if m.get("pair_fields") != list(PAIR_FIELDS):
            raise ValueError(f"metrics of worker {m.get('worker')!r} have unexpected pair fields")
        for layer, targets in enumerate(m["pairs"]):
            for target, values in enumerate(targets):
                if any(values):
                    out.append({"layer": layer, "source": int(m["worker"]), "target": target,
                                **{f: int(v) for f, v in zip(PAIR_FIELDS, values)}})
    return out


def merge(worker_metrics: list[dict]) -> list[dict]:
    """Rows ``{worker, layer, <FIELDS>}`` from every worker's ``to_dict`` (checked, not trusted)."""
    rows = []
    for m in worker_metrics:
        if m.get("fields") != list(FIELDS):
            raise ValueError(f"metrics of worker {m.get('worker')!r} have unexpected fields")
        for layer, values in enumerate(m["layers"]):
            rows.append({"worker": int(m["worker"]), "layer": layer,
                         **{f: float(v) for f, v in zip(FIELDS, values)}})
    return rows


def totals(rows: list[dict]) -> dict:
    """Whole-run sums of every field."""
    return {f: sum(r[f] for r in rows) for f in FIELDS}


def messages_per_round(rows: list[dict]) -> list[int]:
    """Messages sent at each step (round) ``l`` = the rows for layer ``l`` (index 0: none), summed
    over workers and batches. ``docs/runtime.md`` ("Messages per round") gives the formula."""
    return [int(r["messages_sent"]) for r in per_layer(rows)]


def per_layer(rows: list[dict]) -> list[dict]:
    """Sums over workers, one dict per layer (times: the slowest worker's)."""
    layers: dict[int, dict] = {}
    for r in rows:
        acc = layers.setdefault(r["layer"], {"layer": r["layer"], **{f: 0.0 for f in FIELDS}})
        for f in FIELDS:
            acc[f] = max(acc[f], r[f]) if f.endswith("_s") else acc[f] + r[f]
    return [layers[k] for k in sorted(layers)]


def write(rows: list[dict], directory: str, summary: dict | None = None,
          pairs: list[dict] | None = None) -> dict:
    """Write ``metrics.json`` (with the per-pair rows), ``metrics.csv`` and (if matplotlib is
    there) ``metrics.png``. Returns the paths written, by kind.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {"json": os.path.join(directory, "metrics.json"), "csv": os.path.join(directory, "metrics.csv")}
    with open(paths["json"], "w") as f:
        json.dump({"summary": summary or {}, "totals": totals(rows), "rows": rows,
                   "pairs": pairs or []}, f)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["worker", "layer", *FIELDS])
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, os.path.join(directory, "metrics.png"))
    if png:
        paths["png"] = png
    return paths


def plot(rows: list[dict], path: str) -> str | None:
    """Per-layer time (slowest worker, by phase) and bytes sent; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = per_layer(rows)
    x = [r["layer"] for r in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for field in ("compute_s", "wait_s", "encode_s", "decode_s"):
        top.plot(x, [r[field] for r in layers], label=field[:-2])
    top.set_ylabel("seconds (slowest worker)")
    top.legend()
    bottom.bar(x, [r["bytes_sent"] for r in layers])
    bottom.set_ylabel("bytes sent (all workers)")
    bottom.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
