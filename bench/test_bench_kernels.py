"""Kernel timings (pytest-benchmark): ``pytest bench/ --benchmark-only``.

Each timing also checks its result, so a fast wrong kernel fails here too.
"""
import numpy as np
import pytest

import fsd_kernels
from fsd_kernels import kernels
from fsd_runtime import model


@pytest.mark.parametrize("threads", [1, 2])
def test_infer_official_1024x120_10k(benchmark, official, official_packed, threads):
    result = benchmark(fsd_kernels.infer, *official.images.arrays, official_packed, threads=threads)
    np.testing.assert_array_equal(result.categories, official.categories)


@pytest.mark.parametrize("width", [128, 1024])
def test_dense_layer_1024(benchmark, official, official_packed, width):
    """One official layer on a block of live images (layer 3 inputs: varied values)."""
    images = official.images.rows(0, 4 * width)
    warm = model.Network(1024, official.network.layers[:2], official.network.biases[:2]).pack()
    y = fsd_kernels.infer(*images.arrays, warm, threads=1)
    live = np.flatnonzero(np.diff(y.indptr))[:width]
    block = np.zeros((1024, width), np.float32)
    for c, r in enumerate(live):
        block[y.indices[y.indptr[r]:y.indptr[r + 1]], c] = y.data[y.indptr[r]:y.indptr[r + 1]]
    out = np.empty_like(block)
    colptr, rowidx, vals, bias = official_packed.layer_csc(2)
    benchmark(kernels.dense_layer, block, live.size, colptr, rowidx, vals, bias, np.float32(32), out)
    assert np.count_nonzero(out[:, :live.size]) > 0


def test_sparse_layer_first_official_layer(benchmark, official):
    images = official.images.rows(0, 1000)
    w = official.network.layers[0]
    z = benchmark(fsd_kernels.layer, *images.arrays, *w.arrays, official.network.biases[0])
    assert z[0][-1] > 0


def test_csr_rows_to_block(benchmark, official):
    block = np.empty((1024, 1024), np.float32)
    ids = np.empty(1024, np.int64)
    n = benchmark(kernels.csr_rows_to_block, *official.images.arrays, 0, 1024, block, ids)
    assert n == 1024 and np.count_nonzero(block) == official.images.indptr[1024]


def test_infer_synthetic_4096x120(benchmark):
    ds = model.synthetic(4096, 120, 1000, seed=0)
    net = ds.network.pack()
    result = benchmark.pedantic(fsd_kernels.infer, args=(*ds.images.arrays, net), rounds=3, iterations=1)
    assert result.categories.size > 0
