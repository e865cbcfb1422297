"""Networks and inputs: the official Graph Challenge formats, networks users bring (per-neuron
biases and ymax next to the official files, a compact .npz file, scipy or raw CSR arrays from
Python), the embedded default, synthetic nets.

Everything is held as CSR arrays (indptr int64, indices int32, data float32);
a network's layer l is W_l with rows = input neurons, as in the official
``n{N}-l{k}.tsv`` files. The on-disk formats are specified in docs/formats.md.
"""
from __future__ import annotations

import gzip
import io
import lzma
import math
import os
import re
import tokenize
import zipfile
import zlib
from contextlib import contextmanager
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
#: The Graph Challenge clips activations at 32 (the same default as ``fsd_kernels.YMAX``).
YMAX = 32.0
#: An input file's largest image id may exceed its line count this many times (plus 1024) at most.
MAX_IMAGES_PER_LINE = 16
#: The largest image id a categories file may hold (ids are int64 in memory).
MAX_IMAGE_ID = int(np.iinfo(np.int64).max)
#: The largest magnitude a value of the files may have: values are stored as float32, and one
#: beyond this would become inf (checked in float64 before the cast).
FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(ValueError):
    """Network or image data is malformed; the message names the source (file, line and field,
    or the Python argument) and what was expected."""


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
    """An N x N network: ``layers[l]`` is W_l (CSR, rows = inputs), ``biases[l]`` a length-N vector,
    activations clipped at ``ymax``."""

    n_neurons: int
    layers: list[Csr]
    biases: list[np.ndarray]
    ymax: float = YMAX

    @classmethod
    def from_layers(cls, layers, biases, ymax: float = YMAX) -> "Network":
        """A network from Python: each layer a scipy sparse matrix (any format), a :class:`Csr` or
        raw CSR ``(indptr, indices, data)`` (rows = input neurons, N x N); ``biases`` one scalar
        for all layers, or per layer a scalar or a length-N vector (or an L x N array).

        Converted to CSR float32 with sorted column indices; explicit zeros are kept.
        """
        layers = list(layers)
        if not layers:
            raise DataError("a network needs at least one layer")
        n = _n_rows(layers[0], "layer 0 weights")
        csrs = [as_csr(w, (n, n), name=f"layer {l} weights") for l, w in enumerate(layers)]
        return cls(n, csrs, bias_rows(biases, len(csrs), n), check_ymax(ymax, "ymax"))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nnz(self) -> int:
        return sum(w.nnz for w in self.layers)

    def pack(self):
        from fsd_kernels import pack

        return pack([w.arrays for w in self.layers], self.biases, self.n_neurons, ymax=self.ymax)


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
    vals = np.asarray(vals)
    if vals.dtype.kind == "f" and vals.size:  # checked before the cast: beyond float32 would be inf
        bad = ~(np.abs(vals) <= FLOAT32_MAX)
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: entry ({rows[at] + 1}, {cols[at] + 1}) is {float(vals[at])!r}, "
                            f"not a finite value float32 can hold")
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    vals = vals.astype(np.float32)[order]
    if rows.size > 1:
        dup = np.flatnonzero((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1]))
        if dup.size:
            r, c = rows[dup[0]] + 1, cols[dup[0]] + 1
            raise DataError(f"{where}: entry ({r}, {c}) appears more than once")
    indptr = np.zeros(shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return Csr(indptr, cols.astype(np.int32), vals, shape)


# --- networks and images from Python: scipy matrices, Csr, raw CSR arrays ---

def _n_rows(matrix, name: str) -> int:
    """Rows of a matrix in any accepted form (a network's N is its first layer's rows)."""
    if isinstance(matrix, Csr) or _is_scipy(matrix):
        return int(matrix.shape[0])
    if isinstance(matrix, (tuple, list)) and len(matrix) == 3:
        if np.ndim(matrix[0]) != 1 or np.shape(matrix[0])[0] < 1:
            raise DataError(f"{name} indptr: expected a 1-D array of at least one entry, "
                            f"got shape {np.shape(matrix[0])}")
        return int(np.shape(matrix[0])[0]) - 1
    raise DataError(f"{name}: expected a scipy sparse matrix, a Csr or (indptr, indices, data), "
                    f"got {type(matrix).__name__}")


def _is_scipy(matrix) -> bool:
    return hasattr(matrix, "tocsr") and hasattr(matrix, "shape")


def _as_array(name: str, a, dtype, kinds: str) -> np.ndarray:
    """``a`` as a C-contiguous 1-D array of ``dtype``, refusing other kinds and lossy integers."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise DataError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if a.dtype.kind not in kinds:
        raise DataError(f"{name}: expected dtype kind {kinds!r}, got {a.dtype}")
    if np.dtype(dtype).kind in "iu" and a.size:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise DataError(f"{name}: values outside the {np.dtype(dtype).name} range")
    with np.errstate(over="ignore"):  # too large for float32 -> inf -> "not finite" below
        a = np.ascontiguousarray(a.astype(dtype, copy=False))
    return a if a.flags.writeable else a.copy()  # the compiled kernels take writable arrays only


def check_csr(name: str, indptr, indices, data, shape: tuple[int, int]) -> Csr:
    """Validate raw CSR arrays and return a :class:`Csr` in kernel dtypes, column indices sorted.

    Checks lengths, pointers (start at 0, never decrease, end at nnz), index range and finite
    values before anything else touches the arrays; rows with unsorted columns are sorted,
    a column repeated within a row is an error.
    """
    n_rows, n_cols = shape
    indptr = _as_array(f"{name} indptr", indptr, np.int64, "iu")
    indices = _as_array(f"{name} indices", indices, np.int32, "iu")
    data = _as_array(f"{name} data", data, np.float32, "fiub")
    if indptr.shape[0] != n_rows + 1:
        raise DataError(f"{name} indptr: expected {n_rows + 1} entries, got {indptr.shape[0]}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise DataError(f"{name} indptr: must start at 0 and never decrease")
    nnz = int(indptr[-1])
    if indices.shape[0] != nnz or data.shape[0] != nnz:
        raise DataError(f"{name}: indptr ends at {nnz} but there are {indices.shape[0]} indices "
                        f"and {data.shape[0]} values")
    if nnz and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{name} indices: column indices must lie in 0..{n_cols - 1}")
    if not np.all(np.isfinite(data)):
        at = int(np.flatnonzero(~np.isfinite(data))[0])
        raise DataError(f"{name} data: values must be finite, entry {at} is {data[at]}")
    step_ok = _steps_increase(indptr, indices)
    if not step_ok.all():
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
        order = np.lexsort((indices, rows))
        indices, data = indices[order], data[order]
        if not _steps_increase(indptr, indices).all():
            at = int(np.flatnonzero(~_steps_increase(indptr, indices))[0])
            row = int(np.searchsorted(indptr, at + 1, side="right")) - 1
            raise DataError(f"{name} indices: column {int(indices[at])} appears more than once in row {row}")
    return Csr(indptr, indices, data, (n_rows, n_cols))


def _steps_increase(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per consecutive pair of entries: does the column increase (always true across rows)?"""
    nnz = indices.shape[0]
    if nnz < 2:
        return np.ones(0, bool)
    ok = np.diff(indices) > 0  # int32 is enough: both ends lie in [0, n_cols)
    starts = indptr[1:-1]
    ok[starts[(starts > 0) & (starts < nnz)] - 1] = True
    return ok


def as_csr(matrix, shape: tuple[int | None, int], *, name: str = "matrix") -> Csr:
    """A scipy sparse matrix (any format), a :class:`Csr` or raw ``(indptr, indices, data)`` as a
    checked float32 :class:`Csr` of ``shape`` (``None`` rows: take them from the matrix).

    Explicit zeros are kept; scipy's duplicate entries are summed (scipy's own rule), duplicates in
    raw arrays are an error.
    """
    n_rows = _n_rows(matrix, name)
    if shape[0] is not None and n_rows != shape[0]:
        raise DataError(f"{name}: expected {shape[0]} rows, got {n_rows}")
    if isinstance(matrix, Csr) or _is_scipy(matrix):
        if matrix.shape[1] != shape[1]:
            raise DataError(f"{name}: expected shape ({n_rows}, {shape[1]}), got {tuple(matrix.shape)}")
    if _is_scipy(matrix):
        m = matrix.tocsr(copy=True)  # our own copy: summing duplicates sorts in place
        m.sum_duplicates()           # sums and sorts, keeps explicit zeros
        arrays = m.indptr, m.indices, m.data
    else:
        arrays = matrix.arrays if isinstance(matrix, Csr) else matrix
    return check_csr(name, *arrays, (n_rows, shape[1]))


def bias_rows(biases, n_layers: int, n_neurons: int) -> list[np.ndarray]:
    """One float32 length-N bias vector per layer from a scalar, per-layer scalars or vectors."""
    if isinstance(biases, (int, float, np.number)) or isinstance(biases, np.ndarray) and biases.ndim == 0:
        biases = [biases] * n_layers
    biases = list(biases)
    if len(biases) != n_layers:
        raise DataError(f"biases: expected {n_layers} (one per layer), got {len(biases)}")
    rows = []
    for l, b in enumerate(biases):
        b = np.asarray(b)
        if b.dtype.kind not in "fiub":
            raise DataError(f"layer {l} bias: expected real numbers, got dtype {b.dtype}")
        if b.ndim not in (0, 1) or b.ndim == 1 and b.shape[0] != n_neurons:
            raise DataError(f"layer {l} bias: expected a scalar or {n_neurons} values, got shape {b.shape}")
        row = np.empty(n_neurons, np.float32)  # our own writable copy (the kernels want one)
        with np.errstate(over="ignore"):
            row[...] = b
        if not np.all(np.isfinite(row)):
            raise DataError(f"layer {l} bias: values must be finite")
        rows.append(row)
    return rows


def check_ymax(value, where: str) -> float:
    """ymax as a float: finite and positive, exactly representable as float32."""
    try:
        y = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number, got {value!r}") from None
    with np.errstate(over="ignore"):  # too large for float32 -> inf -> refused
        y32 = np.float32(y)
    if not (np.isfinite(y32) and y32 > 0):  # (1e-50 is positive, its float32 is not)
        raise DataError(f"{where}: expected a finite positive number (as a float32), got {value!r}")
    return float(y32)


def as_images(images, n_neurons: int) -> Csr:
    """Images (rows) x neurons from a path (official input file), a scipy matrix, a :class:`Csr`
    or raw ``(indptr, indices, data)``; real values of any sign and size are allowed."""
    if isinstance(images, (str, os.PathLike)):
        return read_images(os.fspath(images), n_neurons)
    return as_csr(images, (None, n_neurons), name="images")


def _open_text(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a corrupt gzip stream
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
            if limit is None and not abs(value) <= FLOAT32_MAX:
                return (f"{path}, line {number}, field {k + 1}: expected a finite value float32 can hold "
                        f"(magnitude at most {FLOAT32_MAX:.7g}), got {_shown(field)}")
    return f"{path}: malformed"


def read_triples(path: str, shape: tuple[int, int]) -> Csr:
    """Read a tab-separated file of 1-based ``row col value`` lines (gzipped or not). A file with
    no entries is an all-zero matrix of ``shape``, as an ``.npz`` layer with no entries is."""
    text = _open_text(path)
    limits = (shape[0], shape[1], None)
    tokens = text.split()
    if not tokens:
        return from_coo([], [], np.zeros(0, np.float32), shape, where=path)
    lines = sum(1 for line in text.splitlines() if line.strip())
    if len(tokens) != 3 * lines:
        raise DataError(_find_bad_line(path, text, 3, limits))
    try:
        triples = np.array(tokens, dtype=np.float64).reshape(-1, 3)
    except ValueError:
        raise DataError(_find_bad_line(path, text, 3, limits)) from None
    r, c, v = triples[:, 0], triples[:, 1], triples[:, 2]
    bad = ~((r == np.floor(r)) & (r >= 1) & (r <= shape[0]) & (c == np.floor(c)) & (c >= 1)
            & (c <= shape[1]) & (np.abs(v) <= FLOAT32_MAX))  # NaN and inf fail too
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
        digits = s.lstrip(b"0")  # bytes: isdigit() means ASCII digits only
        if not s.isdigit() or not digits:
            raise DataError(f"{path}, line {number}: expected a positive integer image id, got {_shown(s)}")
        if len(digits) > len(str(MAX_IMAGE_ID)) or int(digits) > MAX_IMAGE_ID:  # long: before int()
            raise DataError(f"{path}, line {number}: image id {_shown(s)} is too large "
                            f"(at most {MAX_IMAGE_ID})")
        ids.append(int(digits) - 1)
    return np.unique(np.asarray(ids, np.int64))


_LAYER_NAME = re.compile(r"n(\d+)-l(\d+)\.tsv(\.gz)?$")
_BIAS_NAME = re.compile(r"n(\d+)-bias\.tsv(\.gz)?$")
_YMAX_NAME = re.compile(r"n(\d+)-ymax\.tsv$")


def read_network(directory: str, bias: float | None = None) -> Network:
    """Read a directory of official ``n{N}-l{k}.tsv`` layer files (k = 1..L, all present), with
    optional ``n{N}-bias.tsv`` (per-neuron biases) and ``n{N}-ymax.tsv`` files beside them.

    Without a bias file every neuron gets ``bias`` (default: the Graph Challenge bias for N).
    """
    stream = stream_network_dir(directory, bias, whole=True)
    layers, biases = [], []
    for layer, row in stream.layers():
        layers.append(layer)
        biases.append(row)
    return Network(stream.n_neurons, layers, biases, stream.ymax)


@dataclass(frozen=True)
class LayerStream:
    """A network read one layer at a time: ``layers()`` yields (W_l as Csr, bias vector float32)
    for l = 0..n_layers-1, reading (or generating) each layer only when it is asked for."""

    name: str
    n_neurons: int
    n_layers: int
    ymax: float
    layers: object  # () -> iterator of (Csr, np.ndarray)


def stream_network_dir(directory: str, bias: float | None = None, *, whole: bool = False) -> LayerStream:
    """:func:`read_network`'s directory, one layer file at a time (a per-neuron bias file, if
    there is one, is read whole: L x N floats). N is checked against the memory available for
    one layer's per-neuron arrays, or every layer's with ``whole`` (the caller keeps them all)."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: not a directory of n{{N}}-l{{k}}.tsv layer files")
    found, extra = {}, {"bias": [], "ymax": []}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        m = _LAYER_NAME.match(name)
        if m:
            k = int(m.group(2))
            if k in found:  # n64-l1.tsv and n64-l1.tsv.gz, or n64-l1.tsv and n64-l01.tsv
                raise DataError(f"{directory}: several layer {k} files "
                                f"{[os.path.basename(found[k][1]), name]}")
            found[k] = (int(m.group(1)), path)
        for kind, pattern in (("bias", _BIAS_NAME), ("ymax", _YMAX_NAME)):
            m = pattern.match(name)
            if m:
                extra[kind].append((int(m.group(1)), path))
    if not found:
        raise DataError(f"{directory}: no layer files named n{{N}}-l{{k}}.tsv")
    widths = {n for n, _ in found.values()}
    if len(widths) != 1:
        raise DataError(f"{directory}: layer files of several widths {sorted(widths)}")
    n = widths.pop()
    missing = sorted(set(range(1, max(found) + 1)) - set(found))
    if missing:
        raise DataError(f"{directory}: layer files missing for layers {missing[:10]}")
    for kind, files in extra.items():
        if len(files) > 1:
            raise DataError(f"{directory}: several {kind} files {[os.path.basename(p) for _, p in files]}")
        if files and files[0][0] != n:
            raise DataError(f"{files[0][1]}: a {kind} file for N={files[0][0]}, but the layers have N={n}")
    n_layers = len(found)
    # one layer at a time (or all of them kept), plus a per-neuron bias file read whole (L x N float32)
    per_neuron = LAYER_READ_BYTES + (LAYER_HELD_BYTES * (n_layers - 1) if whole else 0)
    check_width(found[1][1], n, n_layers, per_neuron + (4 * n_layers if extra["bias"] else 0))
    if extra["bias"]:
        bias_path = extra["bias"][0][1]
        if bias is not None:
            raise DataError(f"{bias_path}: per-neuron biases are given here; do not pass a scalar bias too")
        biases = read_biases(bias_path, n_layers, n)
        bias_of = biases.__getitem__
    else:
        if bias is None:
            if n not in CHALLENGE_BIAS:
                raise DataError(f"{directory}: no Graph Challenge bias for N={n}; pass a bias "
                                f"or add an n{n}-bias.tsv file")
            bias = CHALLENGE_BIAS[n]
        try:
            bias = float(bias)
        except (TypeError, ValueError):
            raise DataError(f"bias: expected a number, got {bias!r}") from None
        if not abs(bias) <= FLOAT32_MAX:
            raise DataError(f"bias: expected a finite number float32 can hold, got {bias!r}")
        bias_of = lambda l: np.full(n, bias, np.float32)  # noqa: E731
    ymax = read_ymax(extra["ymax"][0][1]) if extra["ymax"] else YMAX

    def layers():
        for k in range(1, n_layers + 1):
            yield read_triples(found[k][1], (n, n)), bias_of(k - 1)

    return LayerStream(os.path.basename(os.path.normpath(directory)), n, n_layers, ymax, layers)


#: The most neurons a network may have: neuron ids are int32 in memory (as in the .npz file).
MAX_NEURONS = int(np.iinfo(np.int32).max)
#: Bytes per neuron a layer holds once read: its row pointers (int64) and bias vector (float32).
LAYER_HELD_BYTES = 8 + 4
#: Bytes per neuron while a layer file is read: the above and the rows' entry counts (int64).
LAYER_READ_BYTES = LAYER_HELD_BYTES + 8


def check_width(path: str, n_neurons: int, n_layers: int, bytes_per_neuron: int) -> None:
    """Refuse an N (from layer file names) that int32 neuron ids cannot hold, or whose per-neuron
    arrays alone (``bytes_per_neuron`` x N: row pointers and biases, nothing of the weights) would
    not fit the memory available now (:func:`fsd_runtime.budget.available_bytes`), before any of
    them is allocated."""
    if n_neurons > MAX_NEURONS:
        raise DataError(f"{path}: N={n_neurons} (from the file name) is more neurons than int32 neuron "
                        f"ids can hold (at most {MAX_NEURONS})")
    from fsd_runtime.budget import available_bytes

    need, available = bytes_per_neuron * n_neurons, available_bytes()
    if available is not None and need > available:
        raise DataError(f"{path}: N={n_neurons} (from the file name) needs {need / 2**30:.1f} GiB for the "
                        f"per-neuron arrays alone of a net of {n_layers} layer(s) ({bytes_per_neuron} bytes a "
                        f"neuron: row pointers and biases), more than the {available / 2**30:.1f} GiB of "
                        f"memory available now")


def read_biases(path: str, n_layers: int, n_neurons: int) -> list[np.ndarray]:
    """Read a bias file of 1-based ``layer neuron value`` lines; neurons not listed get 0."""
    sparse = read_triples(path, (n_layers, n_neurons))
    dense = np.zeros((n_layers, n_neurons), np.float32)
    rows = np.repeat(np.arange(n_layers), np.diff(sparse.indptr))
    dense[rows, sparse.indices] = sparse.data
    return list(dense)


def read_ymax(path: str) -> float:
    """Read a ymax file: one finite positive number (blank lines and surrounding space ignored)."""
    text = _open_text(path)
    lines = [(k, line.strip()) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) != 1:
        raise DataError(f"{path}: expected one line with ymax, got {len(lines)} non-blank lines")
    number, field = lines[0]
    try:
        value = float(field)
    except ValueError:
        raise DataError(f"{path}, line {number}, field 1: expected a number, got {_shown(field)}") from None
    try:
        return check_ymax(value, "ymax")
    except DataError:
        raise DataError(f"{path}, line {number}, field 1: expected a finite positive ymax, got {_shown(field)}") from None


def read_images(path: str, n_neurons: int, n_images: int | None = None) -> Csr:
    """Read an official input file (1-based ``image neuron value``); rows = images."""
    if n_images is None:
        text = _open_text(path)
        tokens = text.split()[0::3]
        if not tokens:
            raise DataError(f"{path}: the file has no entries, so no images (their number is the "
                            f"largest image id)")
        lines = sum(1 for line in text.splitlines() if line.strip())
        # Image ids far beyond the lines read are refused before anything of their size is
        # allocated (an image may have no line, but not thousands of times more images than lines).
        limit = MAX_IMAGES_PER_LINE * lines + 1024
        try:
            n_images = int(max(float(t) for t in tokens))
        except (ValueError, OverflowError):
            raise DataError(_find_bad_line(path, text, 3, (limit, n_neurons, None))) from None
        if n_images < 1:  # every image id is below 1: name the first such line, with a range that is not empty
            raise DataError(_find_bad_line(path, text, 3, (limit, n_neurons, None)))
        if n_images > limit:
            raise DataError(_find_bad_line(path, text, 3, (limit, n_neurons, None))
                            + f" (the file has {lines} lines)")
    return read_triples(path, (n_images, n_neurons))


def load_dataset(weights: str, inputs: str, categories: str | None = None,
                 bias: float | None = None) -> Dataset:
    """Network (directory or .npz, see :func:`load_network`), inputs and optional categories."""
    net = load_network(weights, bias)
    gold = read_categories(categories) if categories else None
    images = read_images(inputs, net.n_neurons)
    if gold is not None:
        gold = gold[gold < images.shape[0]]
    return Dataset(os.path.basename(os.path.normpath(weights)), net, images, gold)


# --- the compact binary network file (.npz, never pickle; spec in docs/formats.md) ---

NPZ_VERSION = 1
#: Most bytes the arrays of one .npz network may declare (uncompressed); a larger file is refused
#: before anything is allocated. The official 65536 x 120 network takes about 2 GB.
MAX_NPZ_BYTES = 2**34
#: field -> (dtype kinds accepted, dimensions); integer fields are range-checked, then cast.
_NPZ_FIELDS = {
    "version": ("iu", 0), "n_neurons": ("iu", 0), "ymax": ("fiu", 0),
    "indptr": ("iu", 2), "indices": ("iu", 1), "data": ("fiu", 1), "biases": ("fiu", 2),
}


def save_network(network: Network, path: str) -> None:
    """Write ``network`` as an .npz file (zip-compressed, exactly at ``path``), read by :func:`load_network`."""
    n = network.n_neurons
    arrays = dict(
        version=np.int64(NPZ_VERSION),
        n_neurons=np.int64(n),
        ymax=np.float32(network.ymax),
        indptr=np.stack([np.asarray(w.indptr, np.int64) for w in network.layers]),
        indices=np.concatenate([np.asarray(w.indices, np.int32) for w in network.layers]),
        data=np.concatenate([np.asarray(w.data, np.float32) for w in network.layers]),
        biases=np.stack([np.broadcast_to(np.asarray(b, np.float32), (n,)) for b in network.biases]),
    )
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


#: What reading a damaged zip member can raise (besides DataError): zipfile's and the
#: decompressors' errors (a bad CRC or stream, an encrypted flag, an unknown compression method
#: or zip version: NotImplementedError, a RuntimeError), and those of numpy's .npy header parser,
#: which evaluates the header's text (SyntaxError, tokenize.TokenError, ValueError, ...).
_MEMBER_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
                  RuntimeError, ValueError, TypeError, OverflowError, KeyError, SyntaxError,
                  tokenize.TokenError)


#: What opening a damaged zip can raise (its directory: an unknown zip version is a
#: NotImplementedError; a bad name encoding a ValueError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
               RuntimeError, ValueError)


@contextmanager
def _member(path: str, key: str):
    """Reading field ``key``'s member: any error of a damaged member becomes a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except _MEMBER_ERRORS as exc:
        raise DataError(f"{path}: field {key!r} cannot be read, its member is damaged "
                        f"({type(exc).__name__}: {exc})") from None


def _npz_headers(path: str, zf: zipfile.ZipFile, max_bytes: int) -> dict:
    """(shape, dtype) of every field, from the .npy headers alone: nothing large is read yet."""
    names = [info.filename for info in zf.infolist()]
    members = {info.filename: info for info in zf.infolist()}
    if len(members) != len(names):
        twice = sorted(name for name in members if names.count(name) > 1)[0]
        raise DataError(f"{path}: member {twice!r} appears more than once")
    unknown = sorted(set(members) - {f"{k}.npy" for k in _NPZ_FIELDS})
    if unknown:
        raise DataError(f"{path}: unexpected member {unknown[0]!r} (fields: {', '.join(_NPZ_FIELDS)})")
    headers, total = {}, 0
    for key, (kinds, ndim) in _NPZ_FIELDS.items():
        info = members.get(f"{key}.npy")
        if info is None:
            raise DataError(f"{path}: field {key!r} is missing")
        with _member(path, key), zf.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
            except (ValueError, SyntaxError, TypeError, OverflowError, KeyError, tokenize.TokenError,
                    RecursionError) as exc:  # numpy evaluates the header's text
                raise DataError(f"{path}: field {key!r} has no valid .npy header "
                                f"({type(exc).__name__}: {exc})") from None
            header_bytes = f.tell()
        if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None:
            raise DataError(f"{path}: field {key!r} has dtype {dtype}; expected kind {kinds!r} "
                            f"(object arrays are never loaded)")
        if len(shape) != ndim:
            raise DataError(f"{path}: field {key!r} must be {ndim}-D, has shape {shape}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise DataError(f"{path}: field {key!r} declares shape {shape}: dimensions must be "
                            f"integers >= 0")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a shape like (2**64,) cannot overflow
        if info.file_size != header_bytes + nbytes:
            raise DataError(f"{path}: field {key!r} declares shape {shape} but its member holds "
                            f"{info.file_size - header_bytes} bytes of data, not {nbytes}")
        total += nbytes
        headers[key] = shape, dtype
    if total > max_bytes:
        raise DataError(f"{path}: the arrays declare {total} bytes, more than the limit {max_bytes}")
    return headers


def _npz_field(path: str, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """A field's array, read whole (its header was checked by :func:`_npz_headers`)."""
    with _member(path, key), zf.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_network_npz(path: str, max_bytes: int = MAX_NPZ_BYTES) -> Network:
    """Read a network .npz file, checking headers, shapes and sizes before reading the large
    arrays and every value before anything uses them; a malformed file raises :class:`DataError`
    naming the file and the field."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_npz(path, zf, max_bytes)
    except DataError:
        raise
    except _ZIP_ERRORS as exc:
        raise DataError(f"{path}: not a readable .npz (zip) file ({type(exc).__name__}: {exc})") from None


def _read_npz(path: str, zf: zipfile.ZipFile, max_bytes: int) -> Network:
    headers = _npz_headers(path, zf, max_bytes)
    small = {k: _npz_field(path, zf, k)[()] for k in ("version", "n_neurons", "ymax")}
    if int(small["version"]) != NPZ_VERSION:
        raise DataError(f"{path}: field 'version' is {int(small['version'])}, this reader knows {NPZ_VERSION}")
    n = int(small["n_neurons"])
    if not 1 <= n <= np.iinfo(np.int32).max:
        raise DataError(f"{path}: field 'n_neurons' must lie in 1..{np.iinfo(np.int32).max}, is {n}")
    ymax = check_ymax(small["ymax"], f"{path}: field 'ymax'")
    (n_layers, width), _ = headers["indptr"]
    if n_layers < 1 or width != n + 1:
        raise DataError(f"{path}: field 'indptr' must have shape (L >= 1, {n + 1}), has {(n_layers, width)}")
    if headers["biases"][0] != (n_layers, n):
        raise DataError(f"{path}: field 'biases' must have shape {(n_layers, n)}, has {headers['biases'][0]}")
    nnz = headers["indices"][0][0]
    if headers["data"][0][0] != nnz:
        raise DataError(f"{path}: fields 'indices' and 'data' differ in length ({nnz}, {headers['data'][0][0]})")
    raw = _npz_field(path, zf, "indptr")
    indptr = _as_array(f"{path}: field 'indptr'", raw.ravel(), np.int64, "iu").reshape(raw.shape)
    if indptr[:, 0].any() or np.any(np.diff(indptr, axis=1) < 0) or indptr[:, -1].max() > nnz:
        raise DataError(f"{path}: field 'indptr': every layer's row pointers must start at 0, "
                        f"never decrease and end within 'indices'")
    ends = np.concatenate([[0], np.cumsum(indptr[:, -1])])
    if ends[-1] != nnz:
        raise DataError(f"{path}: field 'indptr' counts {ends[-1]} entries but 'indices' has {nnz}")
    indices, data = _npz_field(path, zf, "indices"), _npz_field(path, zf, "data")
    layers = [check_csr(f"{path}: layer {l}", indptr[l], indices[ends[l]:ends[l + 1]], data[ends[l]:ends[l + 1]],
                        (n, n)) for l in range(n_layers)]
    biases = _npz_field(path, zf, "biases")
    try:
        rows = bias_rows(biases, n_layers, n)
    except DataError as exc:
        raise DataError(f"{path}: field 'biases': {exc}") from None
    return Network(n, layers, rows, ymax)


def _member_stream(path: str, zf: zipfile.ZipFile, key: str):
    """An open member positioned after its .npy header, with (dtype, fortran order)."""
    with _member(path, key):
        f = zf.open(f"{key}.npy")
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, fortran, dtype = read(f)
        except BaseException:
            f.close()
            raise
    return f, dtype, fortran


def _read_items(path: str, key: str, f, dtype: np.dtype, count: int) -> np.ndarray:
    want = count * dtype.itemsize
    chunks, got = [], 0
    with _member(path, key):
        while got < want:
            chunk = f.read(want - got)
            if not chunk:
                raise DataError(f"{path}: field {key!r} ends early")
            chunks.append(chunk)
            got += len(chunk)
    return np.frombuffer(b"".join(chunks), dtype)


def stream_network_npz(path: str, max_bytes: int = MAX_NPZ_BYTES) -> LayerStream:
    """:func:`read_network_npz`, one layer at a time: the four large fields are read as streams
    (indptr and biases row by row, indices and data a layer's run at a time), every layer checked
    as the whole-file reader checks it. A file written column-major (never by
    :func:`save_network`) is read whole instead."""
    try:
        with zipfile.ZipFile(path) as zf:
            headers = _npz_headers(path, zf, max_bytes)
            small = {k: _npz_field(path, zf, k)[()] for k in ("version", "n_neurons", "ymax")}
            fortran = False
            for k in ("indptr", "biases"):
                f, _, order = _member_stream(path, zf, k)
                f.close()
                fortran = fortran or order
    except DataError:
        raise
    except _ZIP_ERRORS as exc:
        raise DataError(f"{path}: not a readable .npz (zip) file ({type(exc).__name__}: {exc})") from None
    if int(small["version"]) != NPZ_VERSION:
        raise DataError(f"{path}: field 'version' is {int(small['version'])}, this reader knows {NPZ_VERSION}")
    n = int(small["n_neurons"])
    if not 1 <= n <= np.iinfo(np.int32).max:
        raise DataError(f"{path}: field 'n_neurons' must lie in 1..{np.iinfo(np.int32).max}, is {n}")
    ymax = check_ymax(small["ymax"], f"{path}: field 'ymax'")
    (n_layers, width), _ = headers["indptr"]
    if n_layers < 1 or width != n + 1:
        raise DataError(f"{path}: field 'indptr' must have shape (L >= 1, {n + 1}), has {(n_layers, width)}")
    if headers["biases"][0] != (n_layers, n):
        raise DataError(f"{path}: field 'biases' must have shape {(n_layers, n)}, has {headers['biases'][0]}")
    nnz = headers["indices"][0][0]
    if headers["data"][0][0] != nnz:
        raise DataError(f"{path}: fields 'indices' and 'data' differ in length ({nnz}, {headers['data'][0][0]})")
    name = os.path.basename(path)

    def whole():
        net = read_network_npz(path, max_bytes)
        yield from zip(net.layers, net.biases)

    def layers():
        try:
            with zipfile.ZipFile(path) as zf:
                streams = {k: _member_stream(path, zf, k) for k in ("indptr", "indices", "data", "biases")}
                used = 0
                for l in range(n_layers):
                    f, dtype, _ = streams["indptr"]
                    row = _as_array(f"{path}: field 'indptr'", _read_items(path, "indptr", f, dtype, n + 1),
                                    np.int64, "iu")
                    if row[0] != 0 or np.any(np.diff(row) < 0) or used + row[-1] > nnz:
                        raise DataError(f"{path}: field 'indptr': every layer's row pointers must start "
                                        f"at 0, never decrease and end within 'indices'")
                    count = int(row[-1])
                    part = {k: _read_items(path, k, streams[k][0], streams[k][1], count)
                            for k in ("indices", "data")}
                    used += count
                    layer = check_csr(f"{path}: layer {l}", row, part["indices"], part["data"], (n, n))
                    f, dtype, _ = streams["biases"]
                    bias = _read_items(path, "biases", f, dtype, n)
                    if bias.dtype.kind not in "fiub":
                        raise DataError(f"{path}: field 'biases': expected real numbers, got dtype {bias.dtype}")
                    with np.errstate(over="ignore"):
                        bias = bias.astype(np.float32)  # a writable copy
                    if not np.all(np.isfinite(bias)):
                        raise DataError(f"{path}: field 'biases': layer {l} bias: values must be finite")
                    yield layer, bias
                if used != nnz:
                    raise DataError(f"{path}: field 'indptr' counts {used} entries but 'indices' has {nnz}")
                for f, _, _ in streams.values():
                    f.close()
        except DataError:
            raise
        except _ZIP_ERRORS as exc:
            raise DataError(f"{path}: not a readable .npz (zip) file ({type(exc).__name__}: {exc})") from None

    return LayerStream(name, n, n_layers, ymax, whole if fortran else layers)


def stream_network(path: str, bias: float | None = None) -> LayerStream:
    """:func:`load_network`'s sources, one layer at a time (see :class:`LayerStream`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return stream_network_dir(path, bias)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such network directory or .npz file")
    if bias is not None:
        raise DataError(f"{path}: an .npz network holds its own biases; do not pass a bias")
    return stream_network_npz(path)


def load_network(path: str, bias: float | None = None) -> Network:
    """A network from disk: a directory of official layer files (see :func:`read_network`) or an
    .npz file (see :func:`save_network`); ``bias`` applies to directories without a bias file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_network(path, bias)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such network directory or .npz file")
    if bias is not None:
        raise DataError(f"{path}: an .npz network holds its own biases; do not pass a bias")
    return read_network_npz(path)


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
    stream = stream_synthetic(n_neurons, n_layers, seed, bias)
    layers, biases = [], []
    for layer, row in stream.layers():
        layers.append(layer)
        biases.append(row)
    return Network(n_neurons, layers, biases)


def stream_synthetic(n_neurons: int, n_layers: int, seed: int = 0, bias: float | None = None) -> LayerStream:
    """:func:`generate_network`, one layer at a time: the same layers for the same seed (one
    generator, drawn from in layer order either way)."""
    d = CHALLENGE_DEGREE
    if n_neurons < d or n_neurons % _HIGH_RADIX:
        raise ValueError(f"n_neurons must be a multiple of {_HIGH_RADIX} and at least {d}, got {n_neurons}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    if bias is None:
        bias = CHALLENGE_BIAS.get(n_neurons, -0.3)
    n_shifts = int(np.log2(n_neurons // _HIGH_RADIX))

    def layers():
        rng = np.random.default_rng(seed)
        indptr = np.arange(0, n_neurons * d + 1, d, dtype=np.int64)
        values = np.full(n_neurons * d, CHALLENGE_WEIGHT, np.float32)
        for l in range(n_layers):
            cols = _radix_layer(n_neurons, 2 ** (l % n_shifts))
            if l >= n_shifts:
                cols = cols[rng.permutation(n_neurons)]
            cols = np.sort(cols, axis=1).ravel().astype(np.int32)
            yield Csr(indptr, cols, values, (n_neurons, n_neurons)), np.full(n_neurons, bias, np.float32)

    return LayerStream(f"synthetic-{n_neurons}x{n_layers}", n_neurons, n_layers, YMAX, layers)


def _grid_width(n_neurons: int) -> int:
    """2^ceil(log2(N) / 2), in integers (ceil(log2 N) is (N - 1).bit_length())."""
    return 1 << ((int(n_neurons) - 1).bit_length() + 1) // 2


def synthetic_size_problem(n_neurons: int, images: bool = True) -> str | None:
    """Why the synthetic net (and, with ``images``, its images) cannot have ``n_neurons`` (None:
    they can), with the nearest sizes that work: the net needs a multiple of 16, at least 32;
    the images a multiple of their grid's width too."""
    def step(n):  # every size that fits near n is a multiple of this (the widths are powers of 2)
        return max(_HIGH_RADIX, _grid_width(n)) if images else _HIGH_RADIX

    def fits(n):
        return n >= CHALLENGE_DEGREE and n % step(n) == 0

    if fits(n_neurons):
        return None
    below = n_neurons // step(n_neurons) * step(n_neurons)  # a smaller width divides N's: fits if >= 32
    above = max(n_neurons, CHALLENGE_DEGREE)
    while not fits(above):  # going up, the width may grow once
        above = -(-above // step(above)) * step(above)
    nearest = f"{below} or {above}" if below >= CHALLENGE_DEGREE else str(above)
    rule = ", and of its image grid's width, 2^ceil(log2(N)/2)" if images else ""
    return (f"N={n_neurons} does not fit the generator (a multiple of {_HIGH_RADIX}, at least "
            f"{CHALLENGE_DEGREE}{rule}); nearest: {nearest}")


def image_grid(n_neurons: int) -> tuple[int, int]:
    """(height, width) of the pixel grid an input row is read as, row-major like MNIST."""
    width = _grid_width(n_neurons)
    if n_neurons % width:
        raise ValueError(f"n_neurons must be a multiple of {width} for a {width}-wide image grid")
    return n_neurons // width, width


def _distance_transform():
    """scipy's exact Euclidean distance transform, or None where scipy is not installed (it is
    not a runtime dependency; the loop path draws the same pixels, only slower)."""
    try:
        from scipy.ndimage import distance_transform_edt
    except ImportError:
        return None
    return distance_transform_edt


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
    offsets = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
               if dy * dy + dx * dx <= radius * radius]
    centre_y, centre_x = np.rint(points[..., 0]), np.rint(points[..., 1])
    inside = centre_y.size > 0 and (centre_y.min() - reach >= 0 and centre_y.max() + reach <= height - 1
                                    and centre_x.min() - reach >= 0 and centre_x.max() + reach <= width - 1)
    edt = _distance_transform() if inside and len(offsets) > 24 else None
    if edt is not None:
        # Wide strokes (large N): a pixel is drawn iff some centre pixel rint(p) lies within
        # ``radius`` of it, found by one exact Euclidean distance transform per image instead of
        # writing every disk offset around every point. The same pixels as the loop below: no
        # stroke reaches the border (no clipping) and rint(p + d) = rint(p) + d for integer d
        # (ties of .5 aside). 65536 neurons x 10,000 images: minutes -> seconds.
        centres = owner[:, None].astype(np.int64) * n_neurons + (centre_y.astype(np.int64) * width
                                                                   + centre_x.astype(np.int64))
        centres = np.unique(centres)
        dense = np.zeros((n_images, n_neurons), bool)
        bounds = np.searchsorted(centres, np.arange(n_images + 1) * n_neurons)
        free = np.ones((height, width), bool)
        for i in np.flatnonzero(np.diff(bounds)):
            mine = centres[bounds[i]:bounds[i + 1]] - i * n_neurons
            free.fill(True)
            free.flat[mine] = False
            squared = np.rint(np.square(edt(free)))
            dense[i] = (squared <= radius * radius).ravel()
    else:
        dense = np.zeros((n_images, n_neurons), bool)
        owners = np.broadcast_to(owner[:, None], points.shape[:2])
        for dy, dx in offsets:
            y = np.clip(np.rint(points[..., 0] + dy).astype(np.int64), 0, height - 1)
            x = np.clip(np.rint(points[..., 1] + dx).astype(np.int64), 0, width - 1)
            dense[owners, y * width + x] = True
    rows, cols = np.nonzero(dense)
    return from_coo(rows, cols, np.ones(rows.size, np.float32), (n_images, n_neurons), where="synthetic")


def synthetic(n_neurons: int, n_layers: int, n_images: int, seed: int = 0) -> Dataset:
    """A seeded challenge-like net with synthetic inputs (no golden categories)."""
    return Dataset(f"synthetic-{n_neurons}x{n_layers}", generate_network(n_neurons, n_layers, seed),
                   generate_images(n_images, n_neurons, seed=seed + 1), None)
