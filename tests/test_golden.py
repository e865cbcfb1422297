"""The first test of everything: the official categories, and activations bit for bit."""
import numpy as np
import pytest
import scipy.sparse as sp

import fsd_kernels
from fsd_runtime import model


def to_scipy(m: model.Csr):
    return sp.csr_matrix((m.data, m.indices, m.indptr), shape=m.shape)


def scipy_infer(images: model.Csr, network: model.Network, n_layers: int):
    """An independent path: scipy CSR products, bias on the stored entries, ReLU, clip."""
    y = to_scipy(images)
    for w, b in zip(network.layers[:n_layers], network.biases[:n_layers]):
        z = (y @ to_scipy(w)).tocsr()
        z.sort_indices()
        z.data = np.minimum(np.maximum(z.data + b[z.indices], np.float32(0)), np.float32(32))
        z.eliminate_zeros()
        y = z
    return y


def assert_bit_identical(result, reference):
    np.testing.assert_array_equal(result.indptr, reference.indptr)
    np.testing.assert_array_equal(result.indices, reference.indices)
    assert result.data.dtype == reference.data.dtype == np.float32
    np.testing.assert_array_equal(result.data.view(np.uint32), reference.data.view(np.uint32))


def test_embedded_data_is_the_official_subset(official):
    assert official.network.n_neurons == 1024
    assert official.network.n_layers == 120
    assert official.images.shape == (10000, 1024)
    assert official.images.nnz == 1_067_804
    assert all(w.nnz == 32768 for w in official.network.layers)
    assert all(np.all(w.data == np.float32(0.0625)) for w in official.network.layers)
    assert all(np.all(b == np.float32(-0.3)) for b in official.network.biases)
    assert official.categories.size == 337


def test_infer_reproduces_the_337_official_categories(official, official_packed):
    result = fsd_kernels.infer(*official.images.arrays, official_packed)
    np.testing.assert_array_equal(result.categories, official.categories)
    assert_bit_identical(result, scipy_infer(official.images, official.network, 120))


@pytest.mark.parametrize("n_layers, distinct", [(1, 10), (2, 40), (3, 200), (7, 2000)])
def test_truncated_networks_match_scipy_bit_for_bit(official, n_layers, distinct):
    """Early layers hold non-dyadic values of every size, where any other summation order shows."""
    images = official.images.rows(0, 1500)
    net = model.Network(1024, official.network.layers[:n_layers], official.network.biases[:n_layers])
    result = fsd_kernels.infer(*images.arrays, net.pack(), threads=2)
    reference = scipy_infer(images, official.network, n_layers)
    assert np.unique(reference.data).size > distinct, "values varied enough to test summation order"
    assert_bit_identical(result, reference)


def test_sparse_layer_matches_scipy_bit_for_bit(official):
    images = official.images.rows(0, 300)
    y = scipy_infer(images, official.network, 2)
    w = official.network.layers[2]
    got = fsd_kernels.layer(y.indptr, y.indices, y.data, *w.arrays, official.network.biases[2])
    reference = scipy_infer(model.Csr(y.indptr.astype(np.int64), y.indices, y.data, y.shape),
                            model.Network(1024, [w], [official.network.biases[2]]), 1)
    assert_bit_identical(fsd_kernels.Activations(*got, 1024), reference)
