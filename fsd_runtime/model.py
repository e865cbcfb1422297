"""Networks and inputs: the official Graph Challenge formats, the embedded default, synthetic nets.

Everything is held as CSR arrays (indptr int64, indices int32, data float32);
a network's layer l is W_l with rows = input neurons, as in the official
``n{N}-l{k}.tsv`` files.
"""
from __future__ import annotations

import gzip
import io
import lzma
import os
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

#: Graph Challenge bias per network width.
CHALLENGE_BIAS = {1024: -0.3, 4096: -0.35, 16384: -0.4, 65536: -0.45}
#: Graph Challenge weight value.
CHALLENGE_WEIGHT = 1.0 / 16.0
#: Nonzeros per row and per column of a challenge layer.
CHALLENGE_DEGREE = 32
EMBEDDED_FILE = "graphchallenge-1024x120-first10000.npz.xz"
#: An input file's largest image id may exceed its line count this many times (plus 1024) at most.
MAX_IMAGES_PER_LINE = 16


class DataError(ValueError):
    """A data file is malformed; the message names the file, the line and what was expected."""


@dataclass(frozen=True)
class Csr:
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def arrays(self):
        return self.indptr, self.indices, self.data

    def rows(self, start: int, stop: int) -> "Csr":
        lo, hi = self.indptr[start], self.indptr[stop]
        return Csr(self.indptr[start:stop + 1] - lo, self.indices[lo:hi], self.data[lo:hi],
                   (stop - start, self.shape[1]))


@dataclass(frozen=True)
class Network:
    """An N x N network: ``layers[l]`` is W_l (CSR, rows = inputs), ``biases[l]`` a length-N vector."""

    n_neurons: int
    layers: list[Csr]
    biases: list[np.ndarray]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nnz(self) -> int:
        return sum(w.nnz for w in self.layers)

    def pack(self):
        from fsd_kernels import pack

        return pack([w.arrays for w in self.layers], self.biases, self.n_neurons)


@dataclass(frozen=True)
class Dataset:
    """A network, its inputs (images x neurons) and, when known, the golden categories (0-based)."""

    name: str
    network: Network
    images: Csr
    categories: np.ndarray | None


def from_coo(rows, cols, vals, shape, *, where: str) -> Csr:
    """CSR from 0-based triples; duplicates are an error (the formats never repeat an entry)."""
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    vals = np.asarray(vals, np.float32)[order]
    if rows.size > 1:
        dup = np.flatnonzero((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1]))
        if dup.size:
            r, c = rows[dup[0]] + 1, cols[dup[0]] + 1
            raise DataError(f"{where}: entry ({r}, {c}) appears more than once")
    indptr = np.zeros(shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return Csr(indptr, cols.astype(np.int32), vals, shape)


def _open_text(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def _shown(raw: bytes, limit: int = 40) -> str:
    """A piece of a data file, quoted for an error message."""
    return repr(raw[:limit].decode("utf-8", errors="replace"))


def _find_bad_line(path, text: bytes, n_fields: int, limits) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            return f"{path}, line {number}: expected {n_fields} tab-separated fields, got {len(fields)}: {_shown(line, 80)}"
        for k, (field, limit) in enumerate(zip(fields, limits)):
            try:
                value = float(field)
            except ValueError:
                return f"{path}, line {number}, field {k + 1}: expected a number, got {_shown(field)}"
            if limit is not None and not (np.isfinite(value) and value == int(value) and 1 <= value <= limit):
                return f"{path}, line {number}, field {k + 1}: expected an integer in 1..{limit}, got {_shown(field)}"
            if limit is None and not np.isfinite(value):
                return f"{path}, line {number}, field {k + 1}: expected a finite value, got {_shown(field)}"
    return f"{path}: malformed"


def read_triples(path: str, shape: tuple[int, int]) -> Csr:
    """Read a tab-separated file of 1-based ``row col value`` lines (gzipped or not)."""
    text = _open_text(path)
    limits = (shape[0], shape[1], None)
    tokens = text.split()
    if not tokens:
        raise DataError(f"{path}: the file has no entries")
    lines = sum(1 for line in text.splitlines() if line.strip())
    if len(tokens) != 3 * lines:
        raise DataError(_find_bad_line(path, text, 3, limits))
    try:
        triples = np.array(tokens, dtype=np.float64).reshape(-1, 3)
    except ValueError:
        raise DataError(_find_bad_line(path, text, 3, limits)) from None
    r, c, v = triples[:, 0], triples[:, 1], triples[:, 2]
    bad = ~((r == np.floor(r)) & (r >= 1) & (r <= shape[0]) & (c == np.floor(c)) & (c >= 1)
            & (c <= shape[1]) & np.isfinite(v))
    if bad.any():
        raise DataError(_find_bad_line(path, text, 3, limits))
    return from_coo(r.astype(np.int64) - 1, c.astype(np.int64) - 1, v, shape, where=path)


def read_categories(path: str) -> np.ndarray:
    """Read a categories file (one 1-based image id a line); return sorted 0-based ids."""
    text = _open_text(path)
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if not s.isdigit() or int(s) < 1:
            raise DataError(f"{path}, line {number}: expected a positive integer image id, got {_shown(s)}")
        ids.append(int(s) - 1)
    return np.unique(np.asarray(ids, np.int64))


_LAYER_NAME = re.compile(r"n(\d+)-l(\d+)\.tsv(\.gz)?$")


def read_network(directory: str, bias: float | None = None) -> Network:
    """Read a directory of official ``n{N}-l{k}.tsv`` layer files (k = 1..L, all present)."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory of n{{N}}-l{{k}}.tsv layer files")
    found = {}
    for name in os.listdir(directory):
        m = _LAYER_NAME.match(name)
        if m:
            found[int(m.group(2))] = (int(m.group(1)), os.path.join(directory, name))
    if not found:
        raise DataError(f"{directory}: no layer files named n{{N}}-l{{k}}.tsv")
    widths = {n for n, _ in found.values()}
    if len(widths) != 1:
        raise DataError(f"{directory}: layer files of several widths {sorted(widths)}")
    n = widths.pop()
    missing = sorted(set(range(1, max(found) + 1)) - set(found))
    if missing:
        raise DataError(f"{directory}: layer files missing for layers {missing[:10]}")
    if bias is None:
        if n not in CHALLENGE_BIAS:
            raise DataError(f"{directory}: no Graph Challenge bias for N={n}; pass a bias")
        bias = CHALLENGE_BIAS[n]
    layers = [read_triples(found[k][1], (n, n)) for k in range(1, len(found) + 1)]
    return Network(n, layers, [np.full(n, bias, np.float32) for _ in layers])


def read_images(path: str, n_neurons: int, n_images: int | None = None) -> Csr:
    """Read an official input file (1-based ``image neuron value``); rows = images."""
    if n_images is None:
        text = _open_text(path)
        tokens = text.split()[0::3]
        if not tokens:
            raise DataError(f"{path}: the file has no entries")
        lines = sum(1 for line in text.splitlines() if line.strip())
        # Image ids far beyond the lines read are refused before anything of their size is
        # allocated (an image may have no line, but not thousands of times more images than lines).
        limit = MAX_IMAGES_PER_LINE * lines + 1024
        try:
            n_images = int(max(float(t) for t in tokens))
        except (ValueError, OverflowError):
            raise DataError(_find_bad_line(path, text, 3, (limit, n_neurons, None))) from None
        if n_images > limit:
            raise DataError(_find_bad_line(path, text, 3, (limit, n_neurons, None))
                            + f" (the file has {lines} lines)")
    return read_triples(path, (n_images, n_neurons))


def load_dataset(weights: str, inputs: str, categories: str | None = None,
                 bias: float | None = None) -> Dataset:
    net = read_network(weights, bias)
    gold = read_categories(categories) if categories else None
    images = read_images(inputs, net.n_neurons)
    if gold is not None:
        gold = gold[gold < images.shape[0]]
    return Dataset(os.path.basename(os.path.normpath(weights)), net, images, gold)


# --- the embedded default: official 1024x120 network, first 10,000 inputs, categories ---

def _delta(indices: np.ndarray) -> np.ndarray:
    return np.diff(indices.astype(np.int64), prepend=0).astype(np.uint16)


def _undelta(deltas: np.ndarray) -> np.ndarray:
    return (np.cumsum(deltas.astype(np.int64)) % 65536).astype(np.int32)


def write_embedded(dataset: Dataset, path: str) -> None:
    """Write a dataset as an xz-compressed npz (no pickle); indices delta-coded as uint16."""
    net = dataset.network
    if net.n_neurons > 65536:
        raise ValueError("the embedded format holds at most 65536 neurons")
    arrays = dict(
        n_neurons=np.int64(net.n_neurons),
        w_indptr=np.stack([w.indptr for w in net.layers]),
        w_indices=_delta(np.concatenate([w.indices for w in net.layers])),
        w_data=np.concatenate([w.data for w in net.layers]),
        biases=np.stack(net.biases),
        y_indptr=dataset.images.indptr,
        y_indices=_delta(dataset.images.indices),
        y_data=dataset.images.data,
        categories=dataset.categories if dataset.categories is not None else np.zeros(0, np.int64),
    )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with open(path, "wb") as f:
        f.write(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))


def read_embedded(path: str, name: str = "embedded") -> Dataset:
    with open(path, "rb") as f:
        raw = lzma.decompress(f.read())
    z = np.load(io.BytesIO(raw), allow_pickle=False)
    n = int(z["n_neurons"])
    w_indices, w_data = _undelta(z["w_indices"]), z["w_data"]
    layers, offset = [], 0
    for indptr in z["w_indptr"]:
        nnz = int(indptr[-1])
        layers.append(Csr(indptr, w_indices[offset:offset + nnz], w_data[offset:offset + nnz], (n, n)))
        offset += nnz
    y_indptr = z["y_indptr"]
    images = Csr(y_indptr, _undelta(z["y_indices"]), z["y_data"], (len(y_indptr) - 1, n))
    net = Network(n, layers, list(z["biases"]))
    return Dataset(name, net, images, z["categories"])


def embedded() -> Dataset:
    """The official 1024-neuron, 120-layer network with the first 10,000 official inputs."""
    ref = resources.files("fsd_runtime").joinpath("data", EMBEDDED_FILE)
    with resources.as_file(ref) as path:
        return read_embedded(str(path), "graphchallenge-1024x120")


# --- synthetic challenge-like networks and inputs ---

#: Radix of the "any high part" factor of a challenge layer: 16 x 2 = 32 per row.
_HIGH_RADIX = 16


def _radix_layer(n_neurons: int, shift: int) -> np.ndarray:
    """Column ids (N x 32) of one RadiX-Net layer, the rule the official layers 1-6 follow.

    With M = N/16, neuron i feeds every j whose low part ``j mod M`` is
    ``i mod M`` or ``(i - shift) mod M`` (any of the 16 high parts).
    """
    low_size = n_neurons // _HIGH_RADIX
    low = np.arange(n_neurons, dtype=np.int64) % low_size
    high = np.arange(_HIGH_RADIX, dtype=np.int64) * low_size
    return np.concatenate([low[:, None] + high, (low[:, None] - shift) % low_size + high], axis=1)


def generate_network(n_neurons: int, n_layers: int, seed: int = 0,
                     bias: float | None = None) -> Network:
    """A challenge-like net: 32 nonzeros per row and column, weights 1/16, the challenge bias.

    Layers 1..q (q = log2(N/16)) shift the low part by 1, 2, 4 ... 2^(q-1),
    so after q layers every input reaches every output; later layers are
    those patterns cycled with rows permuted by a seeded permutation. For
    N=1024 layers 1-6 are exactly the official ones, and the official
    images give the official 337 categories on this net too.
    """
    d = CHALLENGE_DEGREE
    if n_neurons < d or n_neurons % _HIGH_RADIX:
        raise ValueError(f"n_neurons must be a multiple of {_HIGH_RADIX} and at least {d}, got {n_neurons}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    if bias is None:
        bias = CHALLENGE_BIAS.get(n_neurons, -0.3)
    n_shifts = int(np.log2(n_neurons // _HIGH_RADIX))
    rng = np.random.default_rng(seed)
    indptr = np.arange(0, n_neurons * d + 1, d, dtype=np.int64)
    values = np.full(n_neurons * d, CHALLENGE_WEIGHT, np.float32)
    layers = []
    for l in range(n_layers):
        cols = _radix_layer(n_neurons, 2 ** (l % n_shifts))
        if l >= n_shifts:
            cols = cols[rng.permutation(n_neurons)]
        cols = np.sort(cols, axis=1).ravel().astype(np.int32)
        layers.append(Csr(indptr, cols, values, (n_neurons, n_neurons)))
    return Network(n_neurons, layers, [np.full(n_neurons, bias, np.float32) for _ in layers])


def image_grid(n_neurons: int) -> tuple[int, int]:
    """(height, width) of the pixel grid an input row is read as, row-major like MNIST."""
    width = 2 ** int(np.ceil(np.log2(n_neurons) / 2))
    if n_neurons % width:
        raise ValueError(f"n_neurons must be a multiple of {width} for a {width}-wide image grid")
    return n_neurons // width, width


def generate_images(n_images: int, n_neurons: int, seed: int = 0, max_strokes: int = 5) -> Csr:
    """Binary "handwriting": 1..max_strokes thick straight strokes per image in a central box.

    Drawn on the image grid scaled from MNIST's 32x32 like the official
    larger inputs; strokes get a little thicker with N because the bias
    gets more negative. On the synthetic nets about 1-4% of such images
    survive 120 layers, as about 3% of the official ones do.
    """
    if n_images < 0:
        raise ValueError(f"n_images must not be negative, got {n_images}")
    height, width = image_grid(n_neurons)
    scale = min(height, width) / 32
    rng = np.random.default_rng(seed)
    strokes = rng.integers(1, max_strokes + 1, n_images)
    owner = np.repeat(np.arange(n_images), strokes)
    box = np.array([height, width], np.float64) / 32
    start = rng.uniform(6, 26, (owner.size, 2)) * box
    stop = rng.uniform(6, 26, (owner.size, 2)) * box
    t = np.linspace(0.0, 1.0, int(40 * scale))[None, :, None]
    points = start[:, None, :] + (stop - start)[:, None, :] * t
    radius = scale * (1.0 + 0.15 * np.log2(scale)) if scale > 1 else scale
    reach = int(np.ceil(radius))
    dense = np.zeros((n_images, n_neurons), bool)
    owners = np.broadcast_to(owner[:, None], points.shape[:2])
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            y = np.clip(np.rint(points[..., 0] + dy).astype(np.int64), 0, height - 1)
            x = np.clip(np.rint(points[..., 1] + dx).astype(np.int64), 0, width - 1)
            dense[owners, y * width + x] = True
    rows, cols = np.nonzero(dense)
    return from_coo(rows, cols, np.ones(rows.size, np.float32), (n_images, n_neurons), where="synthetic")


def synthetic(n_neurons: int, n_layers: int, n_images: int, seed: int = 0) -> Dataset:
    """A seeded challenge-like net with synthetic inputs (no golden categories)."""
    return Dataset(f"synthetic-{n_neurons}x{n_layers}", generate_network(n_neurons, n_layers, seed),
                   generate_images(n_images, n_neurons, seed=seed + 1), None)
