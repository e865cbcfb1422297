"""Argument checks for the public kernel API: bad arrays raise ValueError, never reach a kernel."""
import numpy as np


def as_array(name, a, dtype, ndim=1):
    """Return ``a`` as a C-contiguous array of ``dtype``; refuse lossy or odd input."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype != dtype:
        if a.size and np.issubdtype(dtype, np.integer):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
            info = np.iinfo(dtype)
            if a.min() < info.min or a.max() > info.max:
                raise ValueError(f"{name} has values outside the {np.dtype(dtype).name} range")
        elif a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
        with np.errstate(over="ignore"):  # too large for float32 -> inf -> "must be finite"
            a = a.astype(dtype)
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()  # the JIT signatures take writeable arrays only


def integer(name, value, low, high=None):
    """``value`` as a Python int in ``low..high`` (numpy integers too; never a bool or float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in {low}..{'' if high is None else high}, got {value}")
    return int(value)


def csr(name, indptr, indices, data, shape, *, finite=True):
    """Validate a CSR matrix given as raw arrays; return (indptr, indices, data) in kernel dtypes.

    Checks: lengths agree, indptr starts at 0 and never decreases, column
    indices lie in range and strictly increase within each row, values finite.
    """
    n_rows, n_cols = shape
    indptr = as_array(f"{name} indptr", indptr, np.int64)
    indices = as_array(f"{name} indices", indices, np.int32)
    data = as_array(f"{name} data", data, np.float32)
    if indptr.shape[0] != n_rows + 1:
        raise ValueError(f"{name} indptr must have {n_rows + 1} entries, has {indptr.shape[0]}")
    if indptr[0] != 0:
        raise ValueError(f"{name} indptr must start at 0, starts at {indptr[0]}")
    if np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name} indptr must not decrease")
    nnz = int(indptr[-1])
    if indices.shape[0] != nnz or data.shape[0] != nnz:
        raise ValueError(
            f"{name} has indptr[-1]={nnz} but {indices.shape[0]} indices and {data.shape[0]} values"
        )
    if nnz:
        if indices.min() < 0 or indices.max() >= n_cols:
            raise ValueError(f"{name} column indices must lie in [0, {n_cols})")
        step = np.diff(indices)  # int32 is enough: both ends lie in [0, n_cols)
        row_starts = indptr[1:-1]
        inside = np.ones(nnz - 1, bool)
        inside[row_starts[(row_starts > 0) & (row_starts < nnz)] - 1] = False
        if np.any(step[inside] <= 0):
            raise ValueError(f"{name} column indices must strictly increase within each row")
        if finite and not np.all(np.isfinite(data)):
            raise ValueError(f"{name} values must be finite")
    return indptr, indices, data


def vector(name, v, n, dtype=np.float32):
    v = as_array(name, v, dtype)
    if v.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, has {v.shape[0]}")
    if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(v)):
        raise ValueError(f"{name} values must be finite")
    return v


def ymax(value):
    if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0 or not isinstance(
            value.item() if isinstance(value, np.ndarray) else value, (int, float, np.integer, np.floating)):
        raise ValueError(f"ymax must be a real number, got {value!r}")
    with np.errstate(over="ignore"):  # too large for float32 -> inf -> refused below
        value32 = np.float32(value)
    if not np.isfinite(value32) or value32 <= 0:
        raise ValueError(f"ymax must be finite and positive as a float32, got {value!r}")
    return value32
