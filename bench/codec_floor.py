"""How far below zstd-19 could a per-message codec go? Measured floor estimates (issue #3).

The traffic is ``bench/codec.py``'s: every activation block of the official
1024x120 run (10,000 images, 8 workers owning contiguous neuron ranges, 56
blocks a layer). Each block is one message; nothing may be learnt across
messages. For each block this script measures what today's codec sends,
zstd level 19 on the block's raw int32/float32 COO arrays (the issue's
baseline), and the ADAPTIVE code length of its parts under stated models:
sequential estimators summed over the block, so every model pays for learning
its statistics (no empirical conditional entropy). An arithmetic coder gets
within a few bytes of these lengths, so they are what a per-message codec
with these models would send.

Rows: the block's non-empty rows; a row whose images and values equal an
earlier row's is a copy (as in the codec); the other rows are *kept*. Kept
rows are coded in neuron order, each as its image bits then its values, so a
row's contexts may use everything in earlier kept rows. Code lengths:

* ``KT(n0, n1)``: Krichevsky-Trofimov binary code length, -log2 of
  G(n0+1/2) G(n1+1/2) / (pi G(n0+n1+1)); the sum over a context's bits of
  -log2 (count(bit)+1/2)/(count+1) (order within a context does not matter).
* ``KTm(counts, K)``: the same with a Dirichlet(1/2) prior over K symbols.
* ``PPM-C``: a value seen c times among n in a context with d distinct costs
  log2((n+d)/c); an escape costs log2((n+d)/d), free in a context never used;
  escapes go to the next lower order; no exclusions (a small overestimate).

Parts of a block (bytes; a row's "up" = the same image in the previous kept
row, "up2" = two kept rows back, "column predecessor" = the same image's value
in the nearest earlier kept row that has it):

* ``header``: 72 bytes a chunk, as today (one chunk a block, no byte budget).
* ``structure`` (S): which neurons are rows and which rows are copies: 32 bits
  for the first neuron, KT over the presence bits of the neuron span, KT over
  one copy flag a row, log2(kept rows so far) bits to name each copy's source.
* image sets, over kept rows x n_images bits (row-major):
  I0 order-0 KT; I1 KT in context (up bit, column history: 8 * earlier kept
  rows with the image // kept rows so far, 9 buckets); I2 KT in context
  (quantised up *value*: 0 absent, else 1 + clip(exponent*4 + top two
  mantissa bits - 480, 0, 62); up2 bit or none; the column-history bucket);
  I3 KT in context (quantised value of the same image d1 neurons back, its
  presence d2 neurons back, up bit, column-history bucket): d1, d2 are the
  encoder's two best neuron offsets in 1..127 for the block (most kept
  nonzero cells equal to the cell that many neurons back, copies included),
  sent in 2 bytes (the layers' wiring makes e.g. 1 and 32, or 8 and 16,
  neighbours).
* values of kept rows (float32 bit patterns, rows in order, images ascending):
  V0 today's value section (built by the codec's own kernels on the block's
  non-empty rows: image order, constant/dictionary/byte planes) compressed
  alone with zstd level 3, as the codec would (smaller of raw and zstd);
  V1 order-0 PPM-C, each first occurrence paid as a NEW value (below);
  V2 PPM-C over contexts (up, up2) -> (up) -> order 0 -> NEW value;
  V3 numeric residual r = bits(v) - bits(p), p the column predecessor (else
  the previous value in the row, else 0): symbol 0 / sign x bit length of
  |r| by KTm over 65 in context (kind of p, exponent of p), then the bits
  below the leading one by KT per (bit length, position);
  V4 V2's cascade, with NEW values coded by V3's residual model (learnt on
  new values only) instead;
  V5 bitwise: the 32 bits MSB first, KT per (position, the value's previous
  8 bits, whether its bits so far equal p's, p's bit here), p as in V3 (the
  previous bits catch the repeating mantissa patterns of sums of k/16 - 0.3
  terms, e.g. ...3333..., ...6666..., which byte-aligned models see only in
  part and residual models not at all);
  V6 V2's cascade, with NEW values coded by V5's model (learnt on new values);
  V7 PPM-C over (value d1 back, value d2 back) -> (value d1 back) -> order 0,
  NEW values by V5's model with p = the value d1 back if any, else as in V3;
  V8 the same with contexts (value d1 back, up) -> (value d1 back) -> 0;
  Vx, Vp: today's value section (as V0) compressed by xz (``lzma`` preset
  9e, .xz container included) and, when the optional ``pyppmd`` package is
  installed, by PPMd (order 4, 256 MB model): real general-purpose back ends,
  as a check on V1-V8 (xz wins on layers 5-6, see docs/codec.md).
  NEW value (V1, V2): its 32 bits MSB first, the top 12 (sign, exponent,
  3 mantissa bits) by KT in a binary prefix tree, the low 20 by KT per
  (position, exponent).
* ``best``: header + S + min(I0..I3) + min(V0..Vp) + 7 bytes (coder flush 4,
  which models were chosen 1, the offsets d1 and d2 2), chosen per block.

Layers >= 21 repeat layer 20's blocks exactly: that is checked block by block
(hashes) and the whole run is layers 0-20 measured plus 99 x layer 20.

    python bench/codec_floor.py [--layers 0-20] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import sys
import time
from dataclasses import dataclass, field

import numba as nb
import numpy as np
import zstandard

try:
    import pyppmd
except ImportError:  # optional: only the Vp column needs it
    pyppmd = None

from codec import Block, _layer_set, generic_bytes, official_blocks

from fsd_kernels import codec
from fsd_kernels._backend import kernels

N_LAYERS = 120
MEASURED_LAST = 20
#: Bytes a block pays beyond its model code lengths: arithmetic-coder flush (4), the model choices
#: (1) and the two neuron offsets of I3/V7/V8 (2).
CODER_OVERHEAD = 7
#: Largest neuron offset the I3/V7/V8 contexts may use.
MAX_OFFSET = 127
IMAGE_MODELS = ("I0", "I1", "I2", "I3")
VALUE_MODELS = ("V0", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8", "Vx") + (("Vp",) if pyppmd else ())
PPMD_ORDER, PPMD_MEMORY = 4, 256 << 20


# ---------------------------------------------------------------- adaptive code lengths (bits)

@nb.njit(cache=True)
def _kt(n0, n1):
    """Krichevsky-Trofimov code length of a binary sequence with these counts."""
    if n0 + n1 == 0:
        return 0.0
    return (math.log(math.pi) + math.lgamma(n0 + n1 + 1.0) - math.lgamma(n0 + 0.5)
            - math.lgamma(n1 + 0.5)) / 0.6931471805599453


@nb.njit(cache=True)
def _kt_table(counts):
    """Sum of KT lengths over the contexts (rows) of an (m, 2) count table."""
    total = 0.0
    for i in range(counts.shape[0]):
        total += _kt(counts[i, 0], counts[i, 1])
    return total


@nb.njit(cache=True)
def _kt_multi(counts, alphabet):
    """Dirichlet(1/2) adaptive code length of a sequence with these symbol counts."""
    n = 0
    total = 0.0
    for c in counts:
        if c > 0:
            total -= math.lgamma(c + 0.5) - math.lgamma(0.5)
            n += c
    total += math.lgamma(n + alphabet / 2.0) - math.lgamma(alphabet / 2.0)
    return total / 0.6931471805599453


@nb.njit(cache=True)
def image_bits(bitmap, quant):
    """(I0, I1, I2) code lengths of a kept-rows x images bitmap; ``quant`` = quantised values."""
    rows, n = bitmap.shape
    order0 = np.zeros((1, 2), np.int64)
    history = np.zeros((2 * 9, 2), np.int64)
    joint = np.zeros((64 * 3 * 9, 2), np.int64)
    seen = np.zeros(n, np.int64)
    for r in range(rows):
        for j in range(n):
            bit = bitmap[r, j]
            up = bitmap[r - 1, j] if r > 0 else 0
            up2 = bitmap[r - 2, j] if r > 1 else 2
            bucket = (seen[j] * 8) // r if r > 0 else 8
            order0[0, bit] += 1
            history[bucket * 2 + up, bit] += 1
            q = quant[r - 1, j] if r > 0 else 0
            joint[(q * 3 + up2) * 9 + bucket, bit] += 1
            seen[j] += bit
    return _kt_table(order0), _kt_table(history), _kt_table(joint)


@nb.njit(cache=True)
def offset_scores(full, kept_at, max_offset):
    """score[d] = kept nonzero cells equal to the cell d neurons back (``full`` is indexed by
    neuron - first neuron, ``kept_at`` = the kept rows' places in it)."""
    score = np.zeros(max_offset + 1, np.int64)
    columns = np.empty(full.shape[1], np.int64)
    for i in range(kept_at.shape[0]):
        r = kept_at[i]
        k = 0
        for j in range(full.shape[1]):
            if full[r, j]:
                columns[k] = j
                k += 1
        for d in range(1, min(max_offset, r) + 1):
            same = 0
            for q in range(k):
                same += full[r - d, columns[q]] == full[r, columns[q]]
            score[d] += same
    return score


@nb.njit(cache=True)
def offset_image_bits(bitmap, quant_d1, present_d2):
    """I3: KT in context (quantised value d1 neurons back, presence d2 back, up bit, column
    history bucket)."""
    rows, n = bitmap.shape
    counts = np.zeros((64 * 2 * 2 * 9, 2), np.int64)
    seen = np.zeros(n, np.int64)
    for r in range(rows):
        for j in range(n):
            bit = bitmap[r, j]
            up = bitmap[r - 1, j] if r > 0 else 0
            bucket = (seen[j] * 8) // r if r > 0 else 8
            counts[((quant_d1[r, j] * 2 + present_d2[r, j]) * 2 + up) * 9 + bucket, bit] += 1
            seen[j] += bit
    return _kt_table(counts)


@nb.njit(cache=True)
def new_value_bits(values):
    """Code length of new values' bit patterns: top 12 bits in a KT prefix tree, low 20 by KT
    per (position, exponent)."""
    tree = np.zeros((1 << 13, 2), np.int64)
    low = np.zeros((20 * 256, 2), np.int64)
    for v in values:
        node = 1
        for p in range(31, 19, -1):
            bit = (v >> p) & 1
            tree[node, bit] += 1
            node = node * 2 + bit
        exponent = (v >> 23) & 255
        for p in range(19, -1, -1):
            low[p * 256 + exponent, (v >> p) & 1] += 1
    return _kt_table(tree) + _kt_table(low)


@nb.njit(cache=True)
def ppm_bits(symbols, contexts, pairs, n_symbols):
    """PPM-C code length of ``symbols`` over context orders ``contexts[k]`` (highest first; ids)
    with (context, symbol) ids ``pairs[k]``, then order 0; new symbols are escaped, not paid
    here. Returns (bits, mask of first occurrences)."""
    orders = contexts.shape[0]
    size = symbols.shape[0] + 1
    ctx_n = np.zeros((orders, size), np.int64)
    ctx_d = np.zeros((orders, size), np.int64)
    pair_n = np.zeros((orders, size), np.int64)
    count0 = np.zeros(n_symbols, np.int64)
    first = np.zeros(symbols.shape[0], np.bool_)
    d = 0
    bits = 0.0
    for i in range(symbols.shape[0]):  # i symbols coded so far
        s = symbols[i]
        found = False
        for k in range(orders):
            c = contexts[k, i]
            q = pairs[k, i]
            if ctx_n[k, c] > 0:
                if pair_n[k, q] > 0:
                    bits += math.log2((ctx_n[k, c] + ctx_d[k, c]) / pair_n[k, q])
                    found = True
                    break
                bits += math.log2((ctx_n[k, c] + ctx_d[k, c]) / ctx_d[k, c])
        if not found and i > 0:
            bits += math.log2((i + d) / (count0[s] if count0[s] else d))
        if count0[s] == 0:
            d += 1
            first[i] = True
        count0[s] += 1
        for k in range(orders):
            c = contexts[k, i]
            q = pairs[k, i]
            if pair_n[k, q] == 0:
                ctx_d[k, c] += 1
            pair_n[k, q] += 1
            ctx_n[k, c] += 1
    return bits, first


@nb.njit(cache=True)
def residual_bits(values, predictions, contexts, n_contexts):
    """Code length of r = values - predictions (as integers): 0 / sign x bit length by KTm(65)
    per context, then the bits below the leading one by KT per (bit length, position)."""
    symbols = np.zeros((n_contexts, 65), np.int64)
    low = np.zeros((33 * 32, 2), np.int64)
    for i in range(values.shape[0]):
        r = np.int64(values[i]) - np.int64(predictions[i])
        if r == 0:
            symbols[contexts[i], 0] += 1
            continue
        a = -r if r < 0 else r
        length = 0
        while (a >> length) > 0:
            length += 1
        symbols[contexts[i], 1 + (32 if r < 0 else 0) + length - 1] += 1
        for p in range(length - 2, -1, -1):
            low[length * 32 + p, (a >> p) & 1] += 1
    total = 0.0
    for k in range(n_contexts):
        total += _kt_multi(symbols[k], 65)
    return total + _kt_table(low)


@nb.njit(cache=True)
def bitwise_bits(values, predictions):
    """Code length of values' bits MSB first, KT per (position, previous 8 bits of the value,
    prefix equal to the prediction's, the prediction's bit)."""
    counts = np.zeros((32 * 256 * 4, 2), np.int64)
    for i in range(values.shape[0]):
        v = values[i]
        p = predictions[i]
        equal = 1
        history = 0
        for pos in range(31, -1, -1):
            bit = (v >> pos) & 1
            pbit = (p >> pos) & 1
            counts[((pos << 8) | (history & 255)) * 4 + equal * 2 + pbit, bit] += 1
            if bit != pbit:
                equal = 0
            history = (history << 1) | bit
    return _kt_table(counts)


@nb.njit(cache=True)
def column_predictions(matrix):
    """Per nonzero (row-major): the column predecessor's bits, else the previous value in the
    row, else 0; and its kind (0 column, 1 row, 2 none)."""
    rows, n = matrix.shape
    count = 0
    for r in range(rows):
        for j in range(n):
            if matrix[r, j]:
                count += 1
    pred = np.zeros(count, np.uint32)
    kind = np.zeros(count, np.int64)
    last = np.zeros(n, np.uint32)
    i = 0
    for r in range(rows):
        previous = np.uint32(0)
        for j in range(n):
            v = matrix[r, j]
            if v == 0:
                continue
            if last[j]:
                pred[i] = last[j]
            elif previous:
                pred[i] = previous
                kind[i] = 1
            else:
                kind[i] = 2
            previous = v
            last[j] = v
            i += 1
    return pred, kind


# ---------------------------------------------------------------- one block

@dataclass
class Parts:
    """Bytes of one block (or a sum of blocks) by part and model."""

    blocks: int = 0
    nnz: int = 0
    rows: int = 0
    kept_rows: int = 0
    kept_nnz: int = 0
    distinct_values: int = 0
    codec: float = 0
    zstd19: float = 0
    header: float = 0
    structure: float = 0
    rows_today: float = 0
    best: float = 0
    best_images: float = 0
    best_values: float = 0
    models: dict = field(default_factory=dict)
    #: how many blocks each model was the best for (images and values)
    wins: dict = field(default_factory=dict)

    def add(self, other: Parts, times: int = 1) -> None:
        for name in self.__dataclass_fields__:
            if name not in ("models", "wins"):
                setattr(self, name, getattr(self, name) + times * getattr(other, name))
        for mine, theirs in ((self.models, other.models), (self.wins, other.wins)):
            for name, value in theirs.items():
                mine[name] = mine.get(name, 0) + times * value


def _zstd3(raw: bytes) -> int:
    """What the codec sends for a raw section: zstd level 3 when that is smaller."""
    return min(len(zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL).compress(raw)), len(raw)) if raw else 0


def kept_rows(block: Block) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the non-empty rows and, among them, of the kept (non-copy) rows."""
    rows = np.flatnonzero(np.diff(block.row_ptr))
    seen: set = set()
    kept = []
    for i, r in enumerate(rows):
        a, b = block.row_ptr[r], block.row_ptr[r + 1]
        key = (block.images[a:b].tobytes(), block.values[a:b].tobytes())
        if key not in seen:
            seen.add(key)
            kept.append(i)
    return rows, np.array(kept, np.int64)


def today_sections(block: Block, rows: np.ndarray) -> tuple[bytes, bytes]:
    """(neuron+row sections, value section) of today's raw codec payload."""
    row_ptr = np.concatenate(([0], block.row_ptr[rows + 1])).astype(np.int64)
    out = np.empty(16 * rows.size + 9 * block.nnz + 32, np.uint8)
    kept_bits = np.empty(block.nnz, np.uint32)
    counts = np.zeros(1, np.int64)
    pos = kernels.encode_rows(np.ascontiguousarray(block.row_neurons[rows]), row_ptr, block.images.copy(),
                              block.values.view(np.uint32).copy(), out, kept_bits, counts)
    end = kernels.encode_values(kept_bits[:counts[0]].copy(), out, pos)
    return out[:pos].tobytes(), out[pos:end].tobytes()


def structure_bits(neurons: np.ndarray, n_rows: int, kept: np.ndarray) -> float:
    """Neuron set (32 bits + KT over the span's presence bits), copy flags, copy sources."""
    span = int(neurons[-1] - neurons[0]) + 1
    is_kept = np.zeros(n_rows, bool)
    is_kept[kept] = True
    kept_before = np.cumsum(is_kept)[~is_kept]
    return (32 + _kt(span - neurons.size, neurons.size) + _kt(int(is_kept.sum()), int((~is_kept).sum()))
            + float(np.log2(np.maximum(kept_before, 1)).sum()))


def _dense(block: Block, rows: np.ndarray) -> np.ndarray:
    """Kept rows x images matrix of float32 bit patterns (0 = absent; no value is +0.0)."""
    m = np.zeros((rows.size, block.n_images), np.uint32)
    bits = block.values.view(np.uint32)
    for i, r in enumerate(rows):
        a, b = block.row_ptr[r], block.row_ptr[r + 1]
        m[i, block.images[a:b]] = bits[a:b]
    return m


def _quantised(m: np.ndarray) -> np.ndarray:
    """I2's context value: 0 absent, else 1 + clip(exponent*4 + top 2 mantissa bits - 480, 0, 62)."""
    q = np.clip((m >> 21).astype(np.int64) - 480, 0, 62) + 1
    return np.where(m != 0, q, 0)


def _ids(*keys: np.ndarray) -> np.ndarray:
    """Exact dense ids of tuples of uint32 arrays (folded pairwise through 64-bit keys)."""
    ids = np.unique(keys[0], return_inverse=True)[1].astype(np.uint64)
    for k in keys[1:]:
        ids = np.unique((ids << np.uint64(32)) | k.astype(np.uint64), return_inverse=True)[1].astype(np.uint64)
    return ids.astype(np.int64)


def neuron_offsets(block: Block, rows: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cells d1 and d2 neurons back of each kept row (0 where that neuron sends no row): the
    encoder's two best offsets in 1..127 (most kept nonzero cells equal), sent in the block."""
    neurons = block.row_neurons[rows].astype(np.int64)
    full = np.zeros((int(neurons[-1] - neurons[0]) + 1, block.n_images), np.uint32)
    full[neurons - neurons[0]] = _dense(block, rows)
    kept_at = neurons[kept] - neurons[0]
    score = offset_scores(full, kept_at, MAX_OFFSET)
    d1, d2 = (np.argsort(-score[1:], kind="stable")[:2] + 1).tolist()
    padded = np.vstack([np.zeros((MAX_OFFSET, block.n_images), np.uint32), full])
    return padded[kept_at + MAX_OFFSET - d1], padded[kept_at + MAX_OFFSET - d2]


def value_bits(m: np.ndarray, at_d1: np.ndarray, at_d2: np.ndarray) -> dict:
    """V1..V8 code lengths (bits) of the kept rows' values, row-major, and the distinct count."""
    rr, jj = np.nonzero(m)
    values = m[rr, jj]
    up = np.vstack([np.zeros((1, m.shape[1]), np.uint32), m[:-1]])[rr, jj]
    up2 = np.vstack([np.zeros((2, m.shape[1]), np.uint32), m[:-2]])[rr, jj]
    symbols = _ids(values)
    n_symbols = int(symbols.max()) + 1
    o0, first = ppm_bits(symbols, np.zeros((0, values.size), np.int64), np.zeros((0, values.size), np.int64),
                         n_symbols)
    contexts = np.stack([_ids(up, up2), _ids(up)])
    pairs = np.stack([_ids(up, up2, values), _ids(up, values)])
    o2, _ = ppm_bits(symbols, contexts, pairs, n_symbols)
    new = new_value_bits(values[first])
    pred, kind = column_predictions(m)
    ctx = kind * 256 + ((pred >> 23) & 255).astype(np.int64)
    d1, d2 = at_d1[rr, jj], at_d2[rr, jj]
    o7, first7 = ppm_bits(symbols, np.stack([_ids(d1, d2), _ids(d1)]), np.stack([_ids(d1, d2, values), _ids(d1, values)]),
                          n_symbols)
    o8, first8 = ppm_bits(symbols, np.stack([_ids(d1, up), _ids(d1)]), np.stack([_ids(d1, up, values), _ids(d1, values)]),
                          n_symbols)
    pred_d1 = np.where(d1 != 0, d1, pred)
    return {"V1": o0 + new, "V2": o2 + new, "V3": residual_bits(values, pred, ctx, 3 * 256),
            "V4": o2 + residual_bits(values[first], pred[first], ctx[first], 3 * 256),
            "V5": bitwise_bits(values, pred), "V6": o2 + bitwise_bits(values[first], pred[first]),
            "V7": o7 + bitwise_bits(values[first7], pred_d1[first7]),
            "V8": o8 + bitwise_bits(values[first8], pred_d1[first8])}, int(n_symbols)


def measure(block: Block) -> Parts:
    chunks = codec.encode_rows(block.row_neurons, block.row_ptr, block.images, block.values,
                               n_images=block.n_images)
    p = Parts(blocks=1, nnz=block.nnz, codec=sum(map(len, chunks)), header=codec.HEADER_SIZE * len(chunks),
              zstd19=generic_bytes(block, (19,)))
    if np.any(block.values.view(np.uint32) == 0):
        raise ValueError(f"layer {block.layer} block {block.source}->{block.target} stores +0.0 values")
    rows, kept = kept_rows(block)
    p.rows, p.kept_rows = rows.size, kept.size
    p.models = dict.fromkeys(IMAGE_MODELS + VALUE_MODELS, 0.0)
    if not rows.size:
        p.best = p.header
        return p
    row_section, value_section = today_sections(block, rows)
    p.rows_today, p.models["V0"] = _zstd3(row_section), _zstd3(value_section)
    p.models["Vx"] = len(lzma.compress(value_section, preset=9 | lzma.PRESET_EXTREME))
    if pyppmd:
        p.models["Vp"] = len(pyppmd.compress(value_section, max_order=PPMD_ORDER, mem_size=PPMD_MEMORY))
    p.structure = structure_bits(block.row_neurons[rows], rows.size, kept) / 8
    m = _dense(block, rows[kept])
    p.kept_nnz = int(np.count_nonzero(m))
    bitmap = (m != 0).astype(np.uint8)
    at_d1, at_d2 = neuron_offsets(block, rows, kept)
    i_bits = (*image_bits(bitmap, _quantised(m)),
              offset_image_bits(bitmap, _quantised(at_d1), (at_d2 != 0).astype(np.int64)))
    v_bits, p.distinct_values = value_bits(m, at_d1, at_d2)
    p.models.update({name: b / 8 for name, b in zip(IMAGE_MODELS, i_bits)})
    p.models.update({name: b / 8 for name, b in v_bits.items()})
    best_i = min(IMAGE_MODELS, key=p.models.get)
    best_v = min(VALUE_MODELS, key=p.models.get)
    p.best_images, p.best_values = p.models[best_i], p.models[best_v]
    p.wins = {best_i: 1, best_v: 1}
    p.best = p.header + p.structure + p.best_images + p.best_values + CODER_OVERHEAD
    return p


def block_key(block: Block) -> bytes:
    neurons, images, values = block.coo()
    return hashlib.blake2b(neurons.tobytes() + images.tobytes() + values.tobytes(), digest_size=16).digest()


# ---------------------------------------------------------------- the run

def run(layers: set[int]) -> dict:
    by_layer: dict[int, Parts] = {}
    whole = set(range(MEASURED_LAST + 1)) <= layers
    last_keys: dict = {}
    repeats_ok = True
    wanted = layers | (set(range(MEASURED_LAST + 1, N_LAYERS)) if whole else set())
    for block in official_blocks(wanted):
        if block.layer in layers:
            by_layer.setdefault(block.layer, Parts()).add(measure(block))
        if whole and block.layer == MEASURED_LAST:
            last_keys[(block.source, block.target)] = block_key(block)
        elif whole and block.layer > MEASURED_LAST:
            repeats_ok &= last_keys.get((block.source, block.target)) == block_key(block)
    result = {"layers": {str(k): _summary(v) for k, v in sorted(by_layer.items())}}
    measured = Parts()
    for v in by_layer.values():
        measured.add(v)
    result["measured_layers"] = _summary(measured)
    if whole:
        result["repeat_check"] = (f"layers {MEASURED_LAST + 1}-{N_LAYERS - 1}: every block equal to layer "
                                  f"{MEASURED_LAST}'s (same source, target): {repeats_ok}")
        if repeats_ok:
            total = Parts()
            for layer in range(MEASURED_LAST + 1):
                total.add(by_layer[layer])
            total.add(by_layer[MEASURED_LAST], N_LAYERS - 1 - MEASURED_LAST)
            result["whole_run"] = _summary(total)
    return result


def _summary(p: Parts) -> dict:
    out = {name: (round(getattr(p, name)) if isinstance(getattr(p, name), float) else getattr(p, name))
           for name in p.__dataclass_fields__ if name not in ("models", "wins")}
    out["models"] = {k: round(v) for k, v in p.models.items()}
    out["wins"] = dict(sorted(p.wins.items()))
    out["codec_vs_zstd19"] = round(p.codec / p.zstd19, 4) if p.zstd19 else None
    out["best_vs_zstd19"] = round(p.best / p.zstd19, 4) if p.zstd19 else None
    return out


def _print_table(result: dict) -> None:
    cols = ["blocks", "nnz", "rows", "kept_rows", "codec", "zstd19", "header", "structure",
            "rows_today", *IMAGE_MODELS, *VALUE_MODELS, "best"]
    print(" ".join(f"{c:>10}" for c in ["layer", *cols, "codec/z19", "best/z19"]))
    rows = [(k, v) for k, v in result["layers"].items()] + [("measured", result["measured_layers"])]
    if "whole_run" in result:
        rows.append(("whole run", result["whole_run"]))
    for name, s in rows:
        vals = [s[c] if c in s else s["models"][c] for c in cols]
        print(" ".join([f"{name:>10}", *(f"{v:>10,}" for v in vals),
                        f"{s['codec_vs_zstd19']:>10}", f"{s['best_vs_zstd19']:>10}"]))
    if "repeat_check" in result:
        print(result["repeat_check"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=_layer_set, default=set(range(MEASURED_LAST + 1)),
                        help="layers to measure (default 0-20; with all of 0-20 the whole run is extrapolated)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.layers)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["pyppmd"] = pyppmd.__version__ if pyppmd else None
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
