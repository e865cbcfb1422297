"""One validated layer on CSR activations (sparse Gustavson product)."""
import numpy as np

from fsd_kernels import _validate
from fsd_kernels._backend import kernels
from fsd_kernels.infer import LayerOverflowError
from fsd_kernels.network import YMAX


def layer(y_indptr, y_indices, y_data, w_indptr, w_indices, w_data, bias, *, ymax=YMAX):
    """Y (images x N, CSR) through one N x M layer W (CSR, rows = inputs).

    Returns the output CSR ``(indptr, indices, data)`` with sorted columns. A sum that
    overflows float32 raises :class:`~fsd_kernels.LayerOverflowError` (layer 0: this one).
    """
    bias = np.asarray(bias)
    if bias.ndim != 1:
        raise ValueError("bias must be a vector with one entry per output neuron")
    n_out = bias.shape[0]
    w_indptr = _validate.as_array("weights indptr", w_indptr, np.int64)
    y_indptr = _validate.as_array("activations indptr", y_indptr, np.int64)
    if w_indptr.shape[0] < 1 or y_indptr.shape[0] < 1:
        raise ValueError("an indptr needs at least one entry (rows + 1)")
    n_in = w_indptr.shape[0] - 1
    n_images = y_indptr.shape[0] - 1
    y = _validate.csr("activations", y_indptr, y_indices, y_data, (n_images, n_in))
    w = _validate.csr("weights", w_indptr, w_indices, w_data, (n_in, n_out))
    bias = _validate.vector("bias", bias, n_out)
    ymax = _validate.ymax(ymax)
    reach = np.zeros(y[1].shape[0] + 1, np.int64)
    np.cumsum(np.diff(w[0])[y[1]], out=reach[1:])
    row_bound = np.minimum(reach[y[0][1:]] - reach[y[0][:-1]], n_out)
    cap = int(np.sum(row_bound))
    z_indptr = np.empty(n_images + 1, np.int64)
    z_indices = np.empty(cap, np.int32)
    z_data = np.empty(cap, np.float32)
    nnz = kernels.sparse_layer(*y, *w, bias, ymax, z_indptr, z_indices, z_data)
    if nnz < 0:
        raise LayerOverflowError(0, -1 - nnz)
    return z_indptr, z_indices[:nnz].copy(), z_data[:nnz].copy()
