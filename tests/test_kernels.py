"""Every kernel against a plain numpy twin, on random small networks (hypothesis), plus bad input.

The twin is written for clarity, not speed: one float32 term at a time in
ascending input neuron k, then the reference's rule (inferenceReLUvec.m):
the bias only where that float32 sum is numerically nonzero, ReLU, clip.
So equality with the kernels is exact, not approximate.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fsd_kernels
from fsd_kernels import kernels

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the naive twin ---

def naive_layer(y, w, stored, bias, ymax):
    """Y (images x N) through W (N x M dense values, ``stored`` its structure)."""
    n_images, n_in = y.shape
    acc = np.zeros((n_images, w.shape[1]), np.float32)
    for k in range(n_in):
        term = np.where(stored[k], y[:, k:k + 1] * w[k], np.float32(0))
        acc = (acc + term).astype(np.float32)
    z = np.minimum(np.maximum(acc + bias.astype(np.float32), np.float32(0)), np.float32(ymax))
    return np.where(acc != 0, z, np.float32(0)).astype(np.float32) + np.float32(0)  # no -0.0


def naive_network(y, layers, biases, ymax):
    for (w, stored), bias in zip(layers, biases):
        y = naive_layer(y, w, stored, bias, ymax)
    return y


def dense_to_csr(a, stored=None):
    """CSR of a dense matrix; ``stored`` marks the structure (default: the nonzeros)."""
    stored = a != 0 if stored is None else stored
    rows, cols = np.nonzero(stored)
    indptr = np.zeros(a.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=a.shape[0]), out=indptr[1:])
    return indptr, cols.astype(np.int32), a[rows, cols].astype(np.float32)


def csr_to_dense(indptr, indices, data, shape):
    out = np.zeros(shape, np.float32)
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    out[rows, indices] = data
    return out


# --- random small networks ---

#: Challenge-like and odd weights (0 stored, negative), and arbitrary float32 ones whose
#: sums round differently in any other order.
WEIGHTS = st.one_of(st.sampled_from([0.0625, 0.5, 1.0, -0.5, 0.0]), st.floats(-2, 2, width=32))


@st.composite
def networks(draw):
    """(images, [(W, stored)], biases, ymax): empty rows and layers, one image/neuron, any bias sign."""
    n = draw(st.integers(1, 16))
    n_layers = draw(st.integers(1, 4))
    n_images = draw(st.integers(1, 7))
    ymax = draw(st.sampled_from([32.0, 2.0, 1.0]))
    layers, biases = [], []
    for _ in range(n_layers):
        structure = draw(st.sampled_from(["empty", "random", "random", "full"]))
        if structure == "random":
            stored = np.array(draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))).reshape(n, n)
        else:
            stored = np.full((n, n), structure == "full")
        if draw(st.booleans()):  # a positive-only layer that keeps saturation more often
            w = np.where(stored, np.float32(draw(st.sampled_from([0.5, 1.0, 2.0]))), 0)
        else:
            w = np.array(draw(st.lists(WEIGHTS, min_size=n * n, max_size=n * n))).reshape(n, n)
            w = np.where(stored, w, 0)
        layers.append((w.astype(np.float32), stored))
        if draw(st.booleans()):
            biases.append(np.full(n, draw(st.sampled_from([-0.3, 0.0, 0.25, -1.0])), np.float32))
        else:
            biases.append(np.array(draw(st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n)),
                                   np.float32))
    kind = draw(st.sampled_from(["binary", "values", "saturated"]))
    mask = np.array(draw(st.lists(st.booleans(), min_size=n_images * n, max_size=n_images * n)))
    mask = mask.reshape(n_images, n)
    if kind == "binary":
        y = mask.astype(np.float32)
    elif kind == "values":
        vals = draw(st.lists(st.floats(0.0, ymax, width=32), min_size=n_images * n, max_size=n_images * n))
        y = np.where(mask, np.array(vals, np.float32).reshape(n_images, n), np.float32(0))
    else:  # some rows fully at ymax, the others binary
        y = np.where(mask[:, :1], np.float32(ymax), mask.astype(np.float32))
    return y.astype(np.float32), layers, biases, ymax


def pack(layers, biases, ymax):
    return fsd_kernels.pack([dense_to_csr(w, s) for w, s in layers], biases,
                            layers[0][0].shape[0], ymax)


# --- property tests ---

@SETTINGS
@given(networks(), st.sampled_from([None, 1, 2, 3]), st.sampled_from([1, 2]))
def test_infer_equals_the_naive_twin(case, batch_size, threads):
    y, layers, biases, ymax = case
    net = pack(layers, biases, ymax)
    result = fsd_kernels.infer(*dense_to_csr(y), net, batch_size=batch_size, threads=threads)
    got = csr_to_dense(result.indptr, result.indices, result.data, y.shape)
    want = naive_network(y, layers, biases, ymax)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(result.categories, np.flatnonzero(want.any(axis=1)))
    assert np.all(result.data != 0), "the result CSR holds no explicit zeros"


@SETTINGS
@given(networks())
def test_sparse_layer_equals_the_naive_twin(case):
    y, layers, biases, ymax = case
    w, stored = layers[0]
    got = fsd_kernels.layer(*dense_to_csr(y), *dense_to_csr(w, stored), biases[0], ymax=ymax)
    np.testing.assert_array_equal(csr_to_dense(*got, y.shape), naive_layer(y, w, stored, biases[0], ymax))
    indptr, indices, _ = got
    for r in range(y.shape[0]):
        assert np.all(np.diff(indices[indptr[r]:indptr[r + 1]]) > 0), "columns sorted within a row"


@SETTINGS
@given(networks(), st.randoms(use_true_random=False))
def test_dense_layer_on_remapped_rows_equals_the_naive_twin(case, rnd):
    """A worker holds the input rows in its own order: W's row ids are remapped into its block."""
    y, layers, biases, ymax = case
    w, stored = layers[0]
    n = w.shape[0]
    colptr, rowidx, vals, bias = pack(layers[:1], biases[:1], ymax).layer_csc(0)
    held = list(range(n + 2))  # two spare rows the layer never reads
    rnd.shuffle(held)
    block = np.full((n + 2, y.shape[0] + 3), np.float32(7))  # wider than the images used
    for k in range(n):
        block[held[k], :y.shape[0]] = y[:, k]
    remapped = np.array([held[k] for k in rowidx], np.int32)
    out = np.full((n, block.shape[1]), np.float32(-5))
    kernels.dense_layer(block, y.shape[0], colptr, remapped, vals, bias, np.float32(ymax), out)
    want = naive_layer(y, w, stored, biases[0], ymax)
    np.testing.assert_array_equal(out[:, :y.shape[0]].T, want)
    tracked = np.full_like(out, np.float32(-5))
    top, gap = np.full(block.shape[1], np.float32(-1)), np.full(block.shape[1], np.float32(-1))
    kernels.dense_layer_tracked(block, y.shape[0], colptr, remapped, vals, bias, np.float32(ymax), tracked,
                                top, gap)
    np.testing.assert_array_equal(tracked[:, :y.shape[0]], out[:, :y.shape[0]])
    np.testing.assert_array_equal(top[:y.shape[0]], want.max(axis=1, initial=0))
    np.testing.assert_array_equal(gap[:y.shape[0]], (np.float32(ymax) - want).max(axis=1, initial=0))
    # the images among dropped columns of junk: dense_layer_columns picks them out
    width = 2 * y.shape[0] + 3
    columns = np.sort(np.array(rnd.sample(range(width), y.shape[0]), np.int64))
    spread = np.full((n + 2, width), np.float32(9))
    spread[:, columns] = block[:, :y.shape[0]]
    picked = np.full_like(out, np.float32(-5))
    top2, gap2 = np.full_like(top, -1), np.full_like(gap, -1)
    kernels.dense_layer_columns(spread, columns, colptr, remapped, vals, bias, np.float32(ymax), picked,
                                top2, gap2)
    np.testing.assert_array_equal(picked[:, :y.shape[0]], out[:, :y.shape[0]])
    np.testing.assert_array_equal(top2[:y.shape[0]], top[:y.shape[0]])
    np.testing.assert_array_equal(gap2[:y.shape[0]], gap[:y.shape[0]])


def test_dense_layer_columns_equals_the_compacted_block():
    """Tiles that are a contiguous run (read in place) and tiles with dropped columns (gathered)
    give what dense_layer_tracked gives on the block with the dropped columns removed."""
    rng = np.random.default_rng(21)
    n_in, n_out, width = 40, 30, 1500
    block = rng.random((n_in, width), dtype=np.float32) * 40
    block[rng.random(block.shape) < 0.4] = 0
    colptr = np.arange(0, 8 * n_out + 1, 8, dtype=np.int64)
    rowidx = np.concatenate([np.sort(rng.choice(n_in, 8, replace=False)) for _ in range(n_out)]).astype(np.int32)
    vals = np.full(rowidx.shape[0], np.float32(1 / 16))
    bias = np.full(n_out, np.float32(-0.3))
    columns = np.concatenate([np.arange(0, 300), np.flatnonzero(rng.random(width - 300) < 0.7) + 300]).astype(np.int64)
    want, got = (np.zeros((n_out, width), np.float32) for _ in range(2))
    tops, gaps = (np.zeros((2, width), np.float32) for _ in range(2))
    kernels.dense_layer_tracked(np.ascontiguousarray(block[:, columns]), columns.shape[0], colptr, rowidx, vals,
                                bias, np.float32(32), want, tops[0], gaps[0])
    kernels.dense_layer_columns(block, columns, colptr, rowidx, vals, bias, np.float32(32), got, tops[1], gaps[1])
    assert np.any(want[:, :columns.shape[0]] > 0)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(tops[0], tops[1])
    np.testing.assert_array_equal(gaps[0], gaps[1])


def test_row_moves_equal_numpy():
    """The worker's block bookkeeping kernels against plain numpy indexing."""
    rng = np.random.default_rng(5)
    src = rng.random((9, 40), dtype=np.float32)
    dst = rng.random((12, 50), dtype=np.float32)
    src_rows, dst_rows = np.array([4, 0, 8], np.int64), np.array([11, 2, 5], np.int64)
    want = dst.copy()
    want[dst_rows, :30] = src[src_rows, :30]
    kernels.copy_rows(src, src_rows, dst, dst_rows, 30)
    np.testing.assert_array_equal(dst, want)
    want[[1, 11], :17] = 0
    kernels.zero_rows(dst, np.array([1, 11], np.int64), 17)
    np.testing.assert_array_equal(dst, want)


@SETTINGS
@given(networks())
def test_keeps_saturated_flag_matches_the_twin(case):
    """The saturation shortcut is only taken where a saturated row really stays saturated."""
    _, layers, biases, ymax = case
    net = pack(layers, biases, ymax)
    for l, ((w, stored), bias) in enumerate(zip(layers, biases)):
        full = np.full((1, w.shape[0]), np.float32(ymax))
        stays = bool(np.all(naive_layer(full, w, stored, bias, ymax) == ymax))
        assert bool(net.keeps_saturated[l]) == stays


def test_a_layer_that_breaks_saturation_restores_parked_images():
    """Saturated rows are parked, then put back before a layer that does not keep them at ymax."""
    n = 4
    stored = np.ones((n, n), bool)
    keep = np.full((n, n), np.float32(1.0))        # 4 x 32 - 0.3: stays at 32
    shrink = np.full((n, n), np.float32(0.0625))   # 4 x 32 / 16 = 8: leaves saturation
    layers = [(keep, stored), (keep, stored), (shrink, stored), (keep, stored)]
    biases = [np.full(n, -0.3, np.float32)] * 4
    net = pack(layers, biases, 32.0)
    assert net.keeps_saturated.tolist() == [True, True, False, True]
    y = np.array([[32, 32, 32, 32], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    result = fsd_kernels.infer(*dense_to_csr(y), net, threads=1)
    got = csr_to_dense(result.indptr, result.indices, result.data, y.shape)
    np.testing.assert_array_equal(got, naive_network(y, layers, biases, 32.0))
    assert 0 < got[0, 0] < 32.0 and result.categories.tolist() == [0, 1]


def test_coo_and_csr_to_block_scatter_columns():
    block = np.full((3, 4), np.float32(9))
    block[:] = 0
    kernels.coo_to_block(np.array([0, 2], np.int32), np.array([1, 3], np.int32),
                         np.array([1.5, 2.5], np.float32), block)
    assert block[0, 1] == 1.5 and block[2, 3] == 2.5 and np.count_nonzero(block) == 2
    indptr, indices, data = dense_to_csr(np.array([[0, 0, 0], [1, 0, 2], [0, 0, 0], [0, 3, 0]],
                                                  np.float32))
    block = np.full((3, 4), np.float32(9))
    ids = np.empty(4, np.int64)
    n = kernels.csr_rows_to_block(indptr, indices, data, 0, 4, block, ids)
    assert n == 2 and ids[:n].tolist() == [1, 3]
    np.testing.assert_array_equal(block, [[1, 0, 0, 0], [0, 3, 0, 0], [2, 0, 0, 0]])


def test_no_images_and_all_dead_images():
    net = pack([(np.ones((3, 3), np.float32), np.ones((3, 3), bool))], [np.full(3, -5, np.float32)], 32)
    empty = fsd_kernels.infer(np.zeros(1, np.int64), [], [], net)
    assert empty.indptr.tolist() == [0] and empty.categories.size == 0
    dead = fsd_kernels.infer(*dense_to_csr(np.eye(3, dtype=np.float32)), net)
    assert dead.categories.size == 0 and dead.indptr.tolist() == [0, 0, 0, 0]


# --- bad input: a clear ValueError, never a crash or a silent wrong answer ---

@pytest.fixture(scope="module")
def small_net():
    stored = np.eye(3, dtype=bool) | np.eye(3, k=1, dtype=bool)
    return pack([(stored.astype(np.float32), stored)], [np.full(3, -0.1, np.float32)], 32.0)


GOOD_Y = (np.array([0, 2, 3]), np.array([0, 2, 1]), np.array([1.0, 1.0, 1.0]))


@pytest.mark.parametrize("indptr, indices, data, match", [
    (GOOD_Y[0], GOOD_Y[1].astype(np.float64) + 0.5, GOOD_Y[2], "must hold integers"),
    (GOOD_Y[0], GOOD_Y[1], np.array(["a", "b", "c"]), "real numbers"),
    (GOOD_Y[0], GOOD_Y[1], GOOD_Y[2] + 1j, "real numbers"),
    (GOOD_Y[0].reshape(1, 3), GOOD_Y[1], GOOD_Y[2], "must be 1-D"),
    (np.array(5), GOOD_Y[1], GOOD_Y[2], "must be 1-D"),
    (np.array([], np.int64), [], [], "at least one entry"),
    (np.array([1, 2, 3]), GOOD_Y[1], GOOD_Y[2], "must start at 0"),
    (np.array([0, 3, 2]), GOOD_Y[1], GOOD_Y[2], "must not decrease"),
    (np.array([0, 2, 4]), GOOD_Y[1], GOOD_Y[2], "indptr\\[-1\\]=4"),
    (GOOD_Y[0], np.array([0, 3, 1]), GOOD_Y[2], "must lie in"),
    (GOOD_Y[0], np.array([0, -1, 1]), GOOD_Y[2], "must lie in"),
    (GOOD_Y[0], np.array([2, 0, 1]), GOOD_Y[2], "strictly increase"),
    (GOOD_Y[0], np.array([1, 1, 1]), GOOD_Y[2], "strictly increase"),
    (GOOD_Y[0], np.array([0, 2**40, 1]), GOOD_Y[2], "int32 range"),
    (GOOD_Y[0], GOOD_Y[1], np.array([1.0, np.nan, 1.0]), "finite"),
    (GOOD_Y[0], GOOD_Y[1], np.array([1.0, np.inf, 1.0]), "finite"),
    (GOOD_Y[0], GOOD_Y[1], np.array([1.0, 1e39, 1.0]), "finite"),
])
def test_infer_refuses_bad_images(small_net, indptr, indices, data, match):
    with pytest.raises(ValueError, match=match):
        fsd_kernels.infer(indptr, indices, data, small_net)


def test_infer_refuses_bad_options(small_net):
    with pytest.raises(ValueError, match="PackedNetwork"):
        fsd_kernels.infer(*GOOD_Y, small_net._asdict())
    with pytest.raises(ValueError, match="batch_size"):
        fsd_kernels.infer(*GOOD_Y, small_net, batch_size=0)
    with pytest.raises(ValueError, match="threads"):
        fsd_kernels.infer(*GOOD_Y, small_net, threads=0)


def test_pack_refuses_bad_networks():
    eye = dense_to_csr(np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="2 layers but 1 biases"):
        fsd_kernels.pack([eye, eye], [-0.3], 2)
    with pytest.raises(ValueError, match="at least one layer"):
        fsd_kernels.pack([], [], 2)
    with pytest.raises(ValueError, match="n_neurons"):
        fsd_kernels.pack([eye], [-0.3], 0)
    with pytest.raises(ValueError, match="bias must have 2 entries"):
        fsd_kernels.pack([eye], [np.zeros(3)], 2)
    with pytest.raises(ValueError, match="bias values must be finite"):
        fsd_kernels.pack([eye], [np.array([0.0, np.nan])], 2)
    with pytest.raises(ValueError, match="ymax"):
        fsd_kernels.pack([eye], [-0.3], 2, ymax=float("nan"))
    with pytest.raises(ValueError, match="ymax"):
        fsd_kernels.pack([eye], [-0.3], 2, ymax=0)
    with pytest.raises(ValueError, match="layer 0 weights indptr must have 3 entries"):
        fsd_kernels.pack([dense_to_csr(np.eye(3, dtype=np.float32))], [-0.3], 2)
    with pytest.raises(ValueError, match="layer 0 weights column indices must lie in"):
        fsd_kernels.pack([(np.array([0, 1, 1]), np.array([2]), np.array([1.0]))], [-0.3], 2)


def test_layer_refuses_bad_arguments():
    y = dense_to_csr(np.eye(2, dtype=np.float32))
    w = dense_to_csr(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="bias must be a vector"):
        fsd_kernels.layer(*y, *w, -0.3)
    with pytest.raises(ValueError, match="weights column indices must lie in"):
        fsd_kernels.layer(*y, *w, np.zeros(2))
    with pytest.raises(ValueError, match=r"activations column indices must lie in \[0, 1\)"):
        fsd_kernels.layer(*y, *dense_to_csr(np.ones((1, 3), np.float32)), np.zeros(3))
    with pytest.raises(ValueError, match="ymax"):
        fsd_kernels.layer(*y, *w, np.zeros(3), ymax=-1)


def test_layer_refuses_bad_pointers_before_reading_them():
    y = dense_to_csr(np.eye(2, dtype=np.float32))
    w = dense_to_csr(np.ones((2, 3), np.float32))
    for bad_y, bad_w in (((np.array([], np.int64),) + y[1:], w), ((np.array(0),) + y[1:], w),
                         (y, (np.array([], np.int64),) + w[1:]), (y, (np.array(0),) + w[1:])):
        with pytest.raises(ValueError, match="indptr"):
            fsd_kernels.layer(*bad_y, *bad_w, np.zeros(3))


@pytest.mark.parametrize("ymax, says", [(np.array([4.0]), "real number"), (np.array([4.0, 5.0]), "real number"),
                                        (None, "real number"), ("32", "real number"), (1 + 2j, "real number"),
                                        (True, "real number"), (1e39, "float32"), (1e-50, "float32")])
def test_ymax_must_be_one_positive_float32(ymax, says):
    eye = dense_to_csr(np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=says):
        fsd_kernels.pack([eye], [-0.3], 2, ymax=ymax)


@pytest.mark.parametrize("name, value", [("threads", 1.5), ("threads", "2"), ("threads", 10**9),
                                         ("batch_size", 1.5), ("batch_size", "2"), ("batch_size", True)])
def test_infer_takes_whole_numbers_for_threads_and_batches(small_net, name, value):
    with pytest.raises(ValueError, match=name):
        fsd_kernels.infer(*GOOD_Y, small_net, **{name: value})
    assert fsd_kernels.infer(*GOOD_Y, small_net, **{name: np.int64(2)}).indptr.shape == (3,)


def test_pack_takes_whole_neuron_counts_and_read_only_arrays():
    eye = dense_to_csr(np.eye(3, dtype=np.float32))
    for bad in (3.5, 2.7, "3"):
        with pytest.raises(ValueError, match="n_neurons"):
            fsd_kernels.pack([eye], [-0.3], bad)
    frozen = [a.copy() for a in eye]
    for a in frozen:
        a.flags.writeable = False
    bias = np.full(3, -0.1, np.float32)
    bias.flags.writeable = False
    net = fsd_kernels.pack([tuple(frozen)], [bias], 3)  # the JIT once refused read-only arrays
    one = fsd_kernels.pack([dense_to_csr(np.eye(1, dtype=np.float32))], [0.5], 1)  # scalar bias, N=1
    images = np.frombuffer(np.array([0, 1], np.int64).tobytes(), np.int64), np.array([0], np.int32), \
        np.frombuffer(np.array([2.0], np.float32).tobytes(), np.float32)
    assert fsd_kernels.infer(*images, one).data.tolist() == [2.5]
    out = fsd_kernels.layer(*images[:1], images[1], images[2], *frozen, bias)
    assert out[2].tolist() == [np.float32(2.0) - np.float32(0.1)]
    assert net.n_neurons == 3


def test_infer_refuses_a_packed_network_changed_after_packing(small_net):
    """``infer`` trusts no field of a PackedNetwork: derived fields that no longer agree with the
    weights (a new ymax after packing made a saturated image stay parked: a wrong answer) and
    arrays of other types or sizes are refused."""
    layers = [(dense_to_csr(np.eye(4, dtype=np.float32) * 2))]  # 2 * 32 - 20 >= 32, 2 * 4 - 20 < 4
    net = fsd_kernels.pack(layers, [np.full(4, -20.0, np.float32)], 4, ymax=32.0)
    saturated = (np.array([0, 4]), np.arange(4), np.full(4, 32.0))
    assert fsd_kernels.infer(*saturated, net).data.tolist() == [32.0] * 4  # (found whole, remembered)
    with pytest.raises(ValueError, match="keeps_saturated"):
        fsd_kernels.infer(*saturated, net._replace(ymax=np.float32(4.0)))
    assert fsd_kernels.infer(*saturated, fsd_kernels.pack(layers, [np.full(4, -20.0, np.float32)], 4, ymax=4.0)
                             ).data.tolist() == [4.0] * 4
    for change, says in (({"ymax": np.float32(np.nan)}, "ymax"), ({"ymax": 4.0}, "float32"),
                         ({"n_neurons": 1000}, "size"), ({"biases": net.biases.astype(np.float64)}, "biases"),
                         ({"rowidx": np.full_like(net.rowidx, 7)}, "outside"), ({"twins": net.twins[:2]}, "twins"),
                         ({"vals": np.full_like(net.vals, np.inf)}, "finite")):
        with pytest.raises(ValueError, match=says):
            fsd_kernels.infer(*saturated, net._replace(**change))
