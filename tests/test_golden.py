"""The first test of everything: the official categories, exactly."""
import numpy as np

import fsd_kernels


def test_embedded_data_is_the_official_subset(official):
    assert official.network.n_neurons == 1024
    assert official.network.n_layers == 120
    assert official.images.shape == (10000, 1024)
    assert official.images.nnz == 1_067_804
    assert all(w.nnz == 32768 for w in official.network.layers)
    assert official.categories.size == 337


def test_infer_reproduces_the_337_official_categories(official, official_packed):
    result = fsd_kernels.infer(*official.images.arrays, official_packed)
    np.testing.assert_array_equal(result.categories, official.categories)
