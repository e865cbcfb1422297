"""Differential tests: every path against an independent reference, on networks users bring.

The reference lives here and shares no code with the kernels: scipy's float32 CSR product (each
sum in ascending input neuron, numeric zeros dropped), then the Graph Challenge reference's rule
(inferenceReLUvec.m): the bias only on the numeric nonzeros of Y W, ReLU, clip at ymax. On every
example it is itself checked against a dense numpy twin that adds one float32 term at a time.

Random networks: any N (1-40), 1-6 layers, weights of both signs and of any size (explicit zeros
and -0.0 stored), rows and columns with any count of nonzeros, twin columns, a bias per neuron of
either sign, several ymax; real-valued inputs (negative, above ymax), blank images first, last or
everywhere, saturated images, a single image. Paths: serial ``infer`` (1 and 2 threads, several
batch sizes), the one-layer sparse kernel chained, the distributed runtime (P = 1..9, both
partitioners, several batch sizes, thread launcher; a process-launcher sample), and the AOT native
module (tests/conftest.py builds it). ``FSD_DIFFERENTIAL_EXAMPLES=N`` runs a longer campaign.
"""
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fsd_kernels
import fsd_runtime
from fsd_runtime.coordinator import RunError

#: Examples per property in the default suite; the longer campaign sets the variable.
EXAMPLES = int(os.environ.get("FSD_DIFFERENTIAL_EXAMPLES", "0")) or None


def examples(default: int, campaign_cap: int | None = None):
    """``default`` examples in the suite (derandomized); the campaign's count, at most
    ``campaign_cap`` (for the slow process-worker runs)."""
    n = min(EXAMPLES, campaign_cap or EXAMPLES) if EXAMPLES else default
    return settings(max_examples=n, deadline=None, derandomize=EXAMPLES is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the independent reference ---

class ReferenceOverflow(Exception):
    def __init__(self, layer, rows):
        super().__init__(f"layer {layer}: rows {rows}")
        self.layer, self.rows = layer, set(rows)


def reference(images: sp.csr_matrix, layers, biases, ymax) -> sp.csr_matrix:
    """Y_{l+1} = clip(Z + b on nonzero(Z), 0, ymax), Z = Y_l W_l summed as scipy sums, in float32."""
    ymax = np.float32(ymax)
    y = images.astype(np.float32)
    for l, (w, b) in enumerate(zip(layers, biases)):
        z = (y @ w).tocsr()
        z.sum_duplicates()
        z.eliminate_zeros()              # numeric zeros, of either sign: no bias there
        bad = ~np.isfinite(z.data)
        if bad.any():
            rows = np.repeat(np.arange(z.shape[0]), np.diff(z.indptr))[bad]
            raise ReferenceOverflow(l, rows.tolist())
        z.data = np.minimum(np.maximum(z.data + b[z.indices], np.float32(0)), ymax).astype(np.float32)
        z.eliminate_zeros()
        y = z
    y.sort_indices()
    return y


def dense_twin(images: np.ndarray, layers, biases, ymax) -> np.ndarray:
    """The same rule written out densely, one float32 term at a time in ascending k."""
    y = images.astype(np.float32)
    for w, b in zip(layers, biases):
        w = w.toarray()
        z = np.zeros((y.shape[0], w.shape[1]), np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(w.shape[0]):
                z = (z + y[:, k:k + 1] * w[k]).astype(np.float32)
        act = np.minimum(np.maximum(z + b, np.float32(0)), np.float32(ymax))
        y = np.where(z != 0, act, np.float32(0)).astype(np.float32) + np.float32(0)
    return y


# --- random networks users bring ---

WEIGHT_SETS = {
    "challenge": np.array([1 / 16], np.float32),
    "halves": np.array([0.5, -0.5, 1.0, -1.0], np.float32),      # sums cancel to exactly 0 often
    "zeros": np.array([0.0, -0.0, 0.5, -0.25], np.float32),      # explicit (signed) zero weights
}


def random_weights(rng, size):
    kind = rng.choice(["challenge", "halves", "zeros", "normal", "wide"])
    if kind in WEIGHT_SETS:
        return rng.choice(WEIGHT_SETS[kind], size)
    scale = 1.0 if kind == "normal" else 10.0 ** rng.uniform(-3, 2)
    return (rng.standard_normal(size) * scale).astype(np.float32)


def random_layer(rng, n):
    shape = rng.choice(["random", "random", "empty", "full", "diagonal", "twins", "regular"])
    if shape == "empty":
        mask = np.zeros((n, n), bool)
    elif shape == "full":
        mask = np.ones((n, n), bool)
    elif shape == "diagonal":
        mask = np.eye(n, dtype=bool)
    elif shape == "twins":  # groups of equal columns (twin outputs), some with -0.0 for 0.0
        base = rng.random((n, max(1, n // 4))) < rng.uniform(0.1, 0.8)
        mask = base[:, rng.integers(0, base.shape[1], n)]
    elif shape == "regular":  # the same count per column, as the challenge nets
        d = int(rng.integers(1, n + 1))
        mask = np.zeros((n, n), bool)
        for j in range(n):
            mask[rng.choice(n, d, replace=False), j] = True
    else:
        mask = rng.random((n, n)) < rng.uniform(0.0, 1.0)
    values = random_weights(rng, (n, n))
    if shape == "twins":
        values = np.broadcast_to(values[:, :1], (n, n)).copy()
        flip = rng.random((n, n)) < 0.3
        values[flip & (values == 0)] = -0.0
    rows, cols = np.nonzero(mask)
    w = sp.csr_matrix((values[rows, cols], (rows, cols)), shape=(n, n), dtype=np.float32)
    w.sort_indices()
    return w  # explicit zeros kept: constructed from triples, never pruned


def random_bias(rng, n):
    kind = rng.choice(["scalar", "scalar", "uniform", "mixed"])
    if kind == "scalar":
        return np.full(n, rng.choice([-0.3, -0.45, 0.0, 0.25, 1.0, -1.0]), np.float32)
    if kind == "uniform":
        return rng.uniform(-1, 1, n).astype(np.float32)
    return rng.choice(np.array([-0.3, 0.3, 0.0, -0.0, 2.0], np.float32), n)


def random_images(rng, n, n_images, ymax):
    rows = []
    for _ in range(n_images):
        kind = rng.choice(["blank", "binary", "binary", "real", "saturated", "almost"])
        if kind == "blank":
            row = np.zeros(n, np.float32)
        elif kind == "binary":
            row = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(np.float32)
        elif kind == "real":   # also negative and above ymax
            row = np.where(rng.random(n) < 0.5, rng.uniform(-2, 1.5 * ymax, n), 0).astype(np.float32)
        elif kind == "saturated":
            row = np.full(n, ymax, np.float32)
        else:  # saturated but one entry
            row = np.full(n, ymax, np.float32)
            row[rng.integers(n)] = 0 if rng.random() < 0.5 else ymax / 2
        rows.append(row)
    dense = np.array(rows, np.float32).reshape(n_images, n)
    if n_images > 1 and rng.random() < 0.3:
        dense[rng.choice([0, -1])] = 0          # blank first or last
    if rng.random() < 0.05:
        dense[:] = 0                             # every image blank
    return dense


@st.composite
def user_networks(draw, max_n=40, max_layers=6, max_images=12):
    n = draw(st.integers(1, max_n))
    n_layers = draw(st.integers(1, max_layers))
    n_images = draw(st.integers(1, max_images))
    ymax = draw(st.sampled_from([32.0, 8.0, 1.0, 0.75]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers = [random_layer(rng, n) for _ in range(n_layers)]
    biases = [random_bias(rng, n) for _ in range(n_layers)]
    return random_images(rng, n, n_images, ymax), layers, biases, ymax


def pack(layers, biases, ymax):
    return fsd_kernels.pack([(w.indptr, w.indices, w.data) for w in layers], biases,
                            layers[0].shape[0], ymax)


def images_csr(dense: np.ndarray):
    y = sp.csr_matrix(dense)
    y.sort_indices()
    return y.indptr.astype(np.int64), y.indices.astype(np.int32), y.data.astype(np.float32)


def expected(case):
    dense, layers, biases, ymax = case
    want = reference(sp.csr_matrix(dense), layers, biases, ymax)
    np.testing.assert_array_equal(want.toarray(), dense_twin(dense, layers, biases, ymax))
    return want


def assert_bit_identical(got, want: sp.csr_matrix, what=""):
    np.testing.assert_array_equal(got.indptr, want.indptr, err_msg=what)
    np.testing.assert_array_equal(got.indices, want.indices, err_msg=what)
    np.testing.assert_array_equal(np.asarray(got.data, np.float32).view(np.uint32),
                                  want.data.astype(np.float32).view(np.uint32), err_msg=what)


# --- serial, one layer at a time, distributed ---

SHORTCUTS = {"all": {}, "no twins": {"twins": False}, "none": {"shortcuts": False}}


@examples(120)
@given(user_networks(), st.sampled_from([None, 1, 2, 5]), st.sampled_from([1, 2]), st.sampled_from(list(SHORTCUTS)))
def test_serial_infer_equals_the_reference(case, batch_size, threads, shortcuts):
    want = expected(case)
    got = fsd_kernels.infer(*images_csr(case[0]), pack(*case[1:]), batch_size=batch_size, threads=threads,
                            **SHORTCUTS[shortcuts])
    assert_bit_identical(got, want)
    np.testing.assert_array_equal(got.categories, np.flatnonzero(np.diff(want.indptr)))


@examples(60)
@given(user_networks())
def test_sparse_layer_chained_equals_the_reference(case):
    dense, layers, biases, ymax = case
    want = expected(case)
    y = images_csr(dense)
    for w, b in zip(layers, biases):
        y = fsd_kernels.layer(*y, w.indptr, w.indices, w.data, b, ymax=ymax)
    assert_bit_identical(sp.csr_matrix((y[2], y[1], y[0]), shape=want.shape), want)


def distributed(case, n_workers, partition, batch_size, launcher="thread"):
    """Through the public API, with the network as users bring it (scipy matrices, per-neuron bias)."""
    dense, layers, biases, ymax = case
    return fsd_runtime.run(fsd_runtime.Network.from_layers(layers, biases, ymax=ymax), sp.csr_matrix(dense),
                           workers=n_workers, partition=partition, batch_size=batch_size, launcher=launcher)


@examples(40)
@given(user_networks(max_n=30, max_layers=5), st.integers(1, 9), st.sampled_from(["contiguous", "hypergraph"]),
       st.sampled_from([None, 1, 3]))
def test_distributed_run_equals_the_reference(case, n_workers, partition, batch_size):
    n_workers = min(n_workers, case[0].shape[1])
    want = expected(case)
    result = distributed(case, n_workers, partition, batch_size)
    assert_bit_identical(result.activations, want, f"P={n_workers} {partition} batch {batch_size}")


@examples(3, campaign_cap=25)
@given(user_networks(max_n=24, max_layers=4, max_images=8), st.integers(2, 5))
def test_distributed_process_workers_equal_the_reference(case, n_workers):
    n_workers = min(n_workers, case[0].shape[1])
    want = expected(case)
    assert_bit_identical(distributed(case, n_workers, "hypergraph", None, launcher="process").activations, want)


@examples(40)
@given(user_networks())
def test_native_kernels_equal_the_reference(native_kernels, case):
    want = expected(case)
    with native_kernels() as native:
        assert sys.modules["fsd_kernels.infer"].kernels is native and "_native" in native.__name__
        got = fsd_kernels.infer(*images_csr(case[0]), pack(*case[1:]), batch_size=3, threads=1)
    assert_bit_identical(got, want)


# --- the numeric rule where it differs from the structural one ---

def test_bias_is_added_only_where_the_sum_is_numerically_nonzero():
    """0.5 - 0.5 = 0: the structural rule would add the positive bias there; the reference does
    not. A sum of -0.0 terms is zero too; 0.5 + 0.25 is nonzero and gets the bias."""
    rows, cols = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2])
    vals = np.array([0.5, 0.5, -0.5, 0.25, -0.0], np.float32)
    w = sp.csr_matrix((vals, (rows, cols)), shape=(3, 3))
    layers, biases = [w], [np.array([1.0, 1.0, 1.0], np.float32)]
    dense = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1]], np.float32)
    got = fsd_kernels.infer(*images_csr(dense), pack(layers, biases, 32.0), threads=1)
    want = reference(sp.csr_matrix(dense), layers, biases, 32.0)
    assert_bit_identical(got, want)
    # image 0: sums (0, 0.75, -0.0) -> only neuron 1 gets the bias; image 1: (0.5, 0.5, 0); image 2: none
    np.testing.assert_array_equal(sp.csr_matrix((got.data, got.indices, got.indptr), shape=(3, 3)).toarray(),
                                  [[0, 1.75, 0], [1.5, 1.5, 0], [0, 0, 0]])
    for p in (2, 3):
        assert_bit_identical(distributed((dense, layers, biases, 32.0), p, "contiguous", None).activations, want)


def test_outputs_at_zero_and_ymax_and_inputs_beyond():
    """z + b == 0 exactly gives +0.0; z + b > ymax gives ymax; inputs above ymax and below 0 are inputs."""
    w = sp.csr_matrix(np.array([[1.0, 1.0], [1.0, -1.0]], np.float32))
    b = np.array([-0.5, 0.0], np.float32)
    dense = np.array([[0.5, 0.0], [40.0, 0.0], [-3.0, 1.0], [0.25, 0.25]], np.float32)
    got = fsd_kernels.infer(*images_csr(dense), pack([w], [b], 8.0), threads=1)
    out = sp.csr_matrix((got.data, got.indices, got.indptr), shape=(4, 2)).toarray()
    np.testing.assert_array_equal(out, [[0, 0.5], [8, 8], [0, 0], [0, 0]])
    assert not np.signbit(got.data).any() and np.all(got.data != 0)


# --- overflow: a clear error naming layer and image ---

def overflow_case():
    n = 3
    big = sp.csr_matrix(np.full((n, n), 1e30, np.float32))
    small = sp.csr_matrix(np.eye(n, dtype=np.float32))
    dense = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1e10, 1e10, 0]], np.float32)
    return dense, [small, big], [np.zeros(n, np.float32)] * 2, 1e38


def test_overflow_is_an_error_naming_layer_and_image():
    dense, layers, biases, ymax = overflow_case()
    with pytest.raises(ReferenceOverflow) as ref:
        reference(sp.csr_matrix(dense), layers, biases, ymax)
    assert ref.value.layer == 1 and ref.value.rows == {3}
    with pytest.raises(fsd_kernels.LayerOverflowError, match=r"layer 1, image 3 \(0-based\).*overflowed") as err:
        fsd_kernels.infer(*images_csr(dense), pack(layers, biases, ymax), threads=1)
    assert (err.value.layer, err.value.image) == (1, 3) and isinstance(err.value, ValueError)
    y = fsd_kernels.layer(*images_csr(dense), layers[0].indptr, layers[0].indices, layers[0].data, biases[0],
                          ymax=ymax)
    with pytest.raises(fsd_kernels.LayerOverflowError, match="image 3"):
        fsd_kernels.layer(*y, layers[1].indptr, layers[1].indices, layers[1].data, biases[1], ymax=ymax)
    with pytest.raises(RunError, match=r"layer 1: image 3 \(0-based\).*overflowed"):
        distributed((dense, layers, biases, ymax), 2, "contiguous", None)


def test_nan_from_inf_minus_inf_is_an_overflow_too():
    w = sp.csr_matrix(np.array([[3e38, 0, 0], [0, 0, 0], [3e38, 0, 0]], np.float32))
    dense = np.array([[2, 0, -2], [1, 0, 0]], np.float32)   # 6e38 -> inf, -6e38 -> -inf: NaN
    with pytest.raises(ReferenceOverflow):
        reference(sp.csr_matrix(dense), [w], [np.zeros(3, np.float32)], 32.0)
    with pytest.raises(fsd_kernels.LayerOverflowError, match="layer 0, image 0"):
        fsd_kernels.infer(*images_csr(dense), pack([w], [np.zeros(3, np.float32)], 32.0), threads=1)


@pytest.mark.parametrize("what, value", [("inputs", np.inf), ("inputs", np.nan), ("weights", np.inf),
                                         ("weights", -np.inf), ("bias", np.nan), ("ymax", np.inf)])
def test_non_finite_data_is_a_value_error(what, value):
    w, b, ymax = np.array([[1.0, 2.0], [0.0, 1.0]], np.float32), np.zeros(2, np.float32), 32.0
    x = np.array([[1.0, 1.0]], np.float32)
    if what == "inputs":
        x[0, 1] = value
    elif what == "weights":
        w[0, 1] = value
    elif what == "bias":
        b[0] = value
    else:
        ymax = value
    w = sp.csr_matrix(w)
    with pytest.raises(ValueError, match="finite"):
        fsd_kernels.infer(*images_csr(x), fsd_kernels.pack([(w.indptr, w.indices, w.data)], [b], 2, ymax))


# --- the exact shortcuts on networks built to trigger them ---

def shortcut_case(keeps: list[bool], images: np.ndarray, n=6, ymax=4.0):
    """Full layers: weight 1 keeps an all-ymax row at ymax (6 * 4 - 0.5 > 4), 0.0625 leaves it."""
    layers = [sp.csr_matrix(np.full((n, n), 1.0 if k else 0.0625, np.float32)) for k in keeps]
    return images, layers, [np.full(n, -0.5, np.float32)] * len(keeps), ymax


SHORTCUT_CASES = {
    "one parked image before a layer that breaks saturation":
        shortcut_case([True, False, True], np.array([[4] * 6, [1, 0, 0, 0, 0, 0]] + [[0] * 6], np.float32)),
    "exactly one parked image alone":
        shortcut_case([True, False, True, False], np.array([[4] * 6], np.float32)),
    "every image parked, then put back":
        shortcut_case([True, True, False, True], np.full((5, 6), 4.0, np.float32)),
    "images saturate on the way (global early exit)":
        shortcut_case([True] * 6, np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0] * 6], np.float32)),
    "every image dies":
        (np.eye(6, dtype=np.float32), [sp.csr_matrix(np.eye(6, dtype=np.float32))] * 3,
         [np.full(6, -2.0, np.float32)] * 3, 32.0),
}


@pytest.mark.parametrize("name", list(SHORTCUT_CASES))
def test_shortcuts_stay_exact(name):
    case = SHORTCUT_CASES[name]
    dense, layers, biases, ymax = case
    net = pack(layers, biases, ymax)
    want = expected(case)
    if "saturation" in name or "parked" in name:
        assert not net.keeps_saturated.all() and net.keeps_saturated.any()
    for batch_size in (None, 1):
        for shortcuts in SHORTCUTS.values():
            assert_bit_identical(fsd_kernels.infer(*images_csr(dense), net, batch_size=batch_size, threads=1,
                                                   **shortcuts), want)
    for p in (1, 2, 3):
        for batch_size in (None, 1):
            assert_bit_identical(distributed(case, p, "contiguous", batch_size).activations, want, f"P={p}")


def test_twins_that_differ_only_in_signed_zero_weights():
    """Two outputs whose columns differ only in 0.0 against -0.0: not byte-equal twins, same value."""
    n = 4
    dense_w = np.zeros((n, n), np.float32)
    dense_w[:, 0] = dense_w[:, 1] = [0.5, 0.0, -0.5, 0.25]
    rows, cols = np.nonzero(np.ones((n, n), bool))
    vals = dense_w[rows, cols].copy()
    vals[(cols == 1) & (rows == 1)] = -0.0
    w = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    case = (np.array([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 0, 0]], np.float32), [w, w],
            [np.array([0.3, 0.3, -0.1, 0.0], np.float32)] * 2, 32.0)
    want = expected(case)
    assert_bit_identical(fsd_kernels.infer(*images_csr(case[0]), pack(*case[1:]), threads=1), want)
    for p in (2, 3, 4):
        assert_bit_identical(distributed(case, p, "hypergraph", None).activations, want)


def test_more_workers_than_column_groups():
    """Every column of every layer alike (one group): hypergraph gives some workers no neuron;
    they take part with a vacuous status and the run stays exact."""
    n = 8
    w = sp.csr_matrix(np.tile(np.array([[0.5], [-0.25], [0.0], [1.0], [0.5], [0.0], [0.0], [-1.0]], np.float32),
                              (1, n)))
    case = (np.array([[1, 1, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 1, 0, 0, 0]], np.float32),
            [w, w, w], [np.full(n, 0.125, np.float32)] * 3, 32.0)
    want = expected(case)
    for p in (5, 8):
        result = distributed(case, p, "hypergraph", None)
        assert_bit_identical(result.activations, want, f"P={p}")


def naive_twin_map(net) -> np.ndarray:
    """Per layer and output neuron: the first neuron with the same input rows, weights and bias,
    compared as bytes (so 0.0 and -0.0 differ)."""
    out = []
    for l in range(net.n_layers):
        colptr, rowidx, vals, bias = net.layer_csc(l)
        first: dict = {}
        out += [first.setdefault((rowidx[colptr[j]:colptr[j + 1]].tobytes(), vals[colptr[j]:colptr[j + 1]].tobytes(),
                                  bias[j:j + 1].tobytes()), j) for j in range(net.n_neurons)]
    return np.array(out, np.int64)


@examples(60)
@given(user_networks())
def test_twin_map_equals_a_naive_grouping(case):
    net = pack(*case[1:])
    np.testing.assert_array_equal(net.twins, naive_twin_map(net))


def test_official_layers_have_32_or_64_twin_classes(official_packed):
    twins = official_packed.twins.reshape(official_packed.n_layers, -1)
    np.testing.assert_array_equal(twins.ravel(), naive_twin_map(official_packed))
    assert {len(np.unique(row)) for row in twins} == {32, 64}
