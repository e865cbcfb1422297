"""Codec timings on real blocks of the official run (pytest-benchmark): ``pytest bench/test_bench_codec.py``.

One block from each regime: layer 1 (sparse rows, few distinct values),
layer 10 (shared image set, many distinct values), layer 30 (dense rows,
every value 32.0). Each timing checks its result.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

from fsd_kernels import codec

sys.path.insert(0, str(Path(__file__).parent))
from codec import official_blocks

LAYERS = (1, 10, 30)


@pytest.fixture(scope="module")
def blocks():
    """Block 2 -> 3 of each layer in LAYERS."""
    return {b.layer: b for b in official_blocks(set(LAYERS)) if (b.source, b.target) == (2, 3)}


def encode(block):
    return codec.encode_rows(block.row_neurons, block.row_ptr, block.images, block.values,
                             n_images=block.n_images, layer=block.layer, source=2, target=3)


@pytest.mark.parametrize("layer", LAYERS)
def test_encode(benchmark, blocks, layer):
    block = blocks[layer]
    chunks = benchmark(encode, block)
    benchmark.extra_info.update(nnz=block.nnz, bytes=sum(map(len, chunks)))
    assert sum(codec.decode_header(c).nnz for c in chunks) == block.nnz


@pytest.mark.parametrize("layer", LAYERS)
def test_decode(benchmark, blocks, layer):
    block = blocks[layer]
    chunks = encode(block)
    messages = benchmark(lambda: [codec.decode(c) for c in chunks])
    values = np.concatenate([m.values for m in messages])
    np.testing.assert_array_equal(values.view(np.uint32), block.values.view(np.uint32))
    benchmark.extra_info.update(nnz=block.nnz)


@pytest.mark.parametrize("layer", LAYERS)
def test_decode_into(benchmark, blocks, layer):
    block = blocks[layer]
    chunks = encode(block)
    slot_of_neuron = np.full(int(block.row_neurons.max()) + 1, -1, np.int64)
    slot_of_neuron[block.row_neurons] = np.arange(block.row_neurons.size)
    dense = np.zeros((block.row_neurons.size, block.n_images), np.float32)
    benchmark(lambda: [codec.decode_into(c, dense, slot_of_neuron) for c in chunks])
    rows = np.repeat(np.arange(block.row_neurons.size), np.diff(block.row_ptr))
    np.testing.assert_array_equal(dense[rows, block.images], block.values)
    assert np.count_nonzero(dense) == np.count_nonzero(block.values)
