"""Networks users bring: bias/ymax files, the .npz network file, scipy/raw CSR, ``fsd_runtime.run``.

Every run is checked against an independent dense float32 reference written here in plain numpy
(the Graph Challenge reference semantics: the bias is added where the float32 sum is nonzero).
"""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp

import fsd_kernels
import fsd_runtime
from fsd_runtime import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, L, YMAX, N_IMAGES = 37, 5, 8.0, 12


# --- a small random non-RadiX network and inputs, as dense arrays (the test's own truth) ---

def make_case(seed: int, explicit_zeros: bool):
    """Mixed-sign weights (0..9 per row: empty rows and columns occur), per-neuron biases of both
    signs, real inputs (negative, above ymax), the first and the last image blank."""
    rng = np.random.default_rng(seed)
    weights, structure = [], []
    for l in range(L):
        w = np.zeros((N, N), np.float32)
        s = np.zeros((N, N), bool)
        for k in range(N):
            cols = rng.choice(N, rng.integers(0, 10), replace=False)
            s[k, cols] = True
            w[k, cols] = rng.uniform(-1.3, 1.0, cols.size).astype(np.float32)
        if l == 2:  # an output neuron nothing feeds
            s[:, N - 1], w[:, N - 1] = False, 0
        if explicit_zeros:  # entries kept with value 0.0
            ks, js = np.nonzero(s)
            pick = rng.choice(ks.size, ks.size // 6, replace=False)
            w[ks[pick], js[pick]] = 0
        weights.append(w)
        structure.append(s)
    biases = rng.uniform(-1.0, 0.3, (L, N)).astype(np.float32)
    x = np.zeros((N_IMAGES, N), np.float32)
    for i in range(1, N_IMAGES - 1):
        cols = rng.choice(N, rng.integers(1, 12), replace=False)
        x[i, cols] = rng.uniform(-3, 12, cols.size).astype(np.float32)
    return weights, structure, biases, x


def reference(weights, structure, biases, x, ymax=YMAX):
    """Dense float32, inputs summed in ascending order; also counts the outputs where the
    structural-nonzero and numeric-nonzero bias rules differ (a sum cancels to 0, bias > 0)."""
    y, differ = x.astype(np.float32), 0
    for w, s, b in zip(weights, structure, biases):
        z = np.zeros((y.shape[0], N), np.float32)
        for k in range(N):
            z += y[:, k:k + 1] * w[k:k + 1, :]
        reached = ((y != 0).astype(np.int64) @ s.astype(np.int64)) > 0
        differ += int(np.sum(reached & (z == 0) & (b > 0)))
        y = np.where(z != 0, np.clip(z + b, np.float32(0), np.float32(ymax)), np.float32(0)).astype(np.float32)
    return y, differ


def layer_csr(w, s) -> sp.csr_matrix:
    ks, js = np.nonzero(s)
    m = sp.csr_matrix((w[ks, js], (ks, js)), shape=(N, N))
    assert m.nnz == ks.size, "explicit zeros are entries"
    return m


def write_triples(path, rows, cols, vals):
    with open(path, "w") as f:
        f.write("".join(f"{r + 1}\t{c + 1}\t{float(v)!r}\n" for r, c, v in zip(rows, cols, vals)))


def write_layout(directory, weights, structure, biases, ymax=YMAX):
    """The official layout plus n{N}-bias.tsv (zero biases left out) and n{N}-ymax.tsv."""
    os.makedirs(directory, exist_ok=True)
    for k, (w, s) in enumerate(zip(weights, structure), 1):
        ks, js = np.nonzero(s)
        write_triples(os.path.join(directory, f"n{N}-l{k}.tsv"), ks, js, w[ks, js])
    ls, ns = np.nonzero(biases)
    write_triples(os.path.join(directory, f"n{N}-bias.tsv"), ls, ns, biases[ls, ns])
    with open(os.path.join(directory, f"n{N}-ymax.tsv"), "w") as f:
        f.write(f"{ymax}\n")
    return str(directory)


def write_images(path, x):
    rows, cols = np.nonzero(x)
    write_triples(path, rows, cols, x[rows, cols])
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The strict case: no explicit zeros, so no sum cancels where a positive bias would differ."""
    weights, structure, biases, x = make_case(seed=2, explicit_zeros=False)
    root = tmp_path_factory.mktemp("case")
    directory = write_layout(root / "net", weights, structure, biases)
    npz = str(root / "net.npz")
    model.save_network(model.load_network(directory), npz)
    images = write_images(root / "images.tsv", x)
    want, differ = reference(weights, structure, biases, x)
    assert differ == 0, "both bias rules agree on this case"
    return dict(dir=directory, npz=npz, images=images, x=x, want=want, weights=weights,
                structure=structure, biases=biases)


def assert_matches(result, want):
    got = result.to_scipy().toarray()
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit
    np.testing.assert_array_equal(result.categories, np.flatnonzero(want.any(axis=1)))


def test_the_case_is_not_trivial(case):
    cats = np.flatnonzero(case["want"].any(axis=1))
    assert 0 < cats.size < N_IMAGES - 2, "some images survive, some non-blank ones die"
    assert (case["want"] == YMAX).any(), "some activations are clipped at ymax"
    assert (case["x"] < 0).any() and (case["x"] > YMAX).any()
    assert (case["biases"] > 0).any() and (case["biases"] < 0).any()
    assert any(not s.any(axis=0).all() for s in case["structure"]), "some empty columns"
    assert any(not s.any(axis=1).all() for s in case["structure"]), "some empty rows"


# --- on disk: the text layout with bias and ymax files, the .npz file ---

def test_text_layout_round_trip(case):
    net = model.load_network(case["dir"])
    assert net.n_neurons == N and net.n_layers == L and net.ymax == YMAX
    for got, w, s in zip(net.layers, case["weights"], case["structure"]):
        np.testing.assert_array_equal(got.indptr, np.concatenate([[0], np.cumsum(s.sum(axis=1))]))
        np.testing.assert_array_equal(got.data, w[s])  # row-major, columns ascending
    np.testing.assert_array_equal(np.stack(net.biases), case["biases"])  # missing entries are 0


def test_npz_round_trip_keeps_everything(case, tmp_path):
    weights, structure, biases, _ = make_case(seed=1, explicit_zeros=True)
    net = model.Network.from_layers([layer_csr(w, s) for w, s in zip(weights, structure)], biases, ymax=3.5)
    path = str(tmp_path / "zeros.npz")
    model.save_network(net, path)
    back = model.load_network(path)
    assert back.ymax == 3.5 and back.n_neurons == N
    assert back.nnz == sum(int(s.sum()) for s in structure), "explicit zeros survive"
    for a, b in zip(net.layers, back.layers):
        for x, y in zip(a.arrays, b.arrays):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(np.stack(back.biases), biases)
    for a, b in zip(model.load_network(case["npz"]).layers, model.load_network(case["dir"]).layers):
        np.testing.assert_array_equal(a.data, b.data)
    assert back.pack().ymax == np.float32(3.5)


def test_explicit_zero_weights_in_text_files_are_kept(tmp_path):
    write_triples(tmp_path / "n3-l1.tsv", [0, 0, 2], [1, 2, 0], [0.0, -0.5, 0.0])
    net = model.read_network(str(tmp_path), bias=0.25)
    w = net.layers[0]
    assert w.nnz == 3 and w.indptr.tolist() == [0, 2, 2, 3] and w.data.tolist() == [0.0, -0.5, 0.0]
    assert net.ymax == 32.0 and np.all(net.biases[0] == np.float32(0.25))


def test_text_files_with_no_entries_are_all_zero(case, tmp_path):
    """An empty layer file is an all-zero layer and an empty bias file all-zero biases, as
    docs/formats.md says (rows and columns may have no entries) and as the .npz file allows; an
    input file with no entries has no image count and is refused."""
    weights = [w.copy() for w in case["weights"]]
    structure = [s.copy() for s in case["structure"]]
    weights[3][:], structure[3][:] = 0, False
    directory = write_layout(tmp_path / "net", weights, structure, np.zeros((L, N), np.float32))
    (tmp_path / "net" / f"n{N}-l4.tsv").write_text("\n  \n")  # blank lines only
    assert os.path.getsize(tmp_path / "net" / f"n{N}-bias.tsv") == 0
    net = model.read_network(directory)
    assert net.layers[3].nnz == 0 and net.layers[3].indptr.tolist() == [0] * (N + 1)
    assert all(not b.any() for b in net.biases)
    model.save_network(net, str(tmp_path / "net.npz"))
    assert model.load_network(str(tmp_path / "net.npz")).layers[3].nnz == 0
    x = case["x"]
    want, _ = reference(weights, structure, np.zeros((L, N), np.float32), x)
    assert not want.any(), "nothing passes an all-zero layer"
    result = fsd_runtime.run(directory, model.read_images(case["images"], N, N_IMAGES), workers=3)
    assert_matches(result, want)
    (tmp_path / "none.tsv").write_text("")
    with pytest.raises(model.DataError, match=r"none.tsv: the file has no entries, so no images"):
        model.read_images(str(tmp_path / "none.tsv"), N)
    assert model.read_images(str(tmp_path / "none.tsv"), N, n_images=4).shape == (4, N)


@pytest.mark.parametrize("name, lines, match", [
    ("n4-bias.tsv", ["1\t1\t0.5", "3\t2\t0.5"], r"n4-bias.tsv, line 2, field 1: expected an integer in 1..2, got '3'"),
    ("n4-bias.tsv", ["1\t5\t0.5"], r"n4-bias.tsv, line 1, field 2: expected an integer in 1..4"),
    ("n4-bias.tsv", ["1\t1\t-0.5", "2\t1\tinf"], r"n4-bias.tsv, line 2, field 3: expected a finite value"),
    ("n4-bias.tsv", ["1\t1\tx"], r"n4-bias.tsv, line 1, field 3: expected a number, got 'x'"),
    ("n4-bias.tsv", ["1\t1"], r"n4-bias.tsv, line 1: expected 3 tab-separated fields, got 2"),
    ("n4-bias.tsv", ["2\t3\t0.5", "2\t3\t0.25"], r"n4-bias.tsv: entry \(2, 3\) appears more than once"),
    ("n5-bias.tsv", ["1\t1\t0.5"], r"n5-bias.tsv: a bias file for N=5, but the layers have N=4"),
    ("n4-ymax.tsv", ["eight"], r"n4-ymax.tsv, line 1, field 1: expected a number, got 'eight'"),
    ("n4-ymax.tsv", ["", "-1"], r"n4-ymax.tsv, line 2, field 1: expected a finite positive ymax"),
    ("n4-ymax.tsv", ["1e39"], r"n4-ymax.tsv, line 1, field 1: expected a finite positive ymax"),
    ("n4-ymax.tsv", ["nan"], r"n4-ymax.tsv, line 1, field 1: expected a finite positive ymax"),
    ("n4-ymax.tsv", ["8", "9"], r"n4-ymax.tsv: expected one line with ymax, got 2"),
    ("n4-ymax.tsv", [], r"n4-ymax.tsv: expected one line with ymax, got 0"),
])
def test_malformed_bias_and_ymax_files(tmp_path, name, lines, match):
    for k in (1, 2):
        write_triples(tmp_path / f"n4-l{k}.tsv", [0], [0], [1.0])
    with open(tmp_path / name, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    with pytest.raises(model.DataError, match=match) as err:
        model.read_network(str(tmp_path), bias=None if "bias" in name else 0.0)
    assert str(tmp_path / name) in str(err.value)


def test_bias_file_and_scalar_bias_do_not_mix(tmp_path):
    write_triples(tmp_path / "n4-l1.tsv", [0], [0], [1.0])
    write_triples(tmp_path / "n4-bias.tsv", [0], [3], [-0.5])
    assert model.read_network(str(tmp_path)).biases[0].tolist() == [0, 0, 0, -0.5]
    with pytest.raises(model.DataError, match=r"n4-bias.tsv: per-neuron biases are given here"):
        model.read_network(str(tmp_path), bias=-0.3)


# --- malformed .npz files: a DataError naming the file and the field, before any large allocation ---

def good_arrays():
    """The arrays of a valid 2-layer, 3-neuron network file."""
    return dict(version=np.int64(1), n_neurons=np.int64(3), ymax=np.float32(8),
                indptr=np.array([[0, 2, 2, 3], [0, 1, 2, 3]], np.int64),
                indices=np.array([0, 2, 1, 0, 1, 2], np.int32),
                data=np.array([1, -2, 0, 3, 4, 5], np.float32),
                biases=np.array([[0.5, -0.5, 0], [0, 0, -1]], np.float32))


def changed(**changes):
    arrays = good_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


@pytest.mark.parametrize("arrays, match", [
    (changed(biases=None), r"field 'biases' is missing"),
    (dict(good_arrays(), extra=np.zeros(1)), r"unexpected member 'extra.npy'"),
    (changed(indices=np.array([0, 2, 1, 0, 1, 2], np.float64)), r"field 'indices' has dtype float64"),
    (changed(data=np.array(["a"] * 6)), r"field 'data' has dtype <U1"),
    (changed(version=np.int64(2)), r"field 'version' is 2"),
    (changed(n_neurons=np.int64(0)), r"field 'n_neurons' must lie in 1\.\."),
    (changed(n_neurons=np.array([3])), r"field 'n_neurons' must be 0-D"),
    (changed(ymax=np.float32(-1)), r"field 'ymax': expected a finite positive number"),
    (changed(ymax=np.float64(np.inf)), r"field 'ymax': expected a finite positive number"),
    (changed(indptr=np.array([[0, 2, 2, 3]], np.int64)), r"field 'biases' must have shape \(1, 3\)"),
    (changed(indptr=np.array([[0, 2, 3], [0, 1, 3]], np.int64)), r"field 'indptr' must have shape \(L >= 1, 4\)"),
    (changed(indptr=np.zeros((0, 4), np.int64), biases=np.zeros((0, 3), np.float32)),
     r"field 'indptr' must have shape \(L >= 1, 4\)"),
    (changed(indptr=np.array([[0, 2, 1, 3], [0, 1, 2, 3]], np.int64)), r"field 'indptr': every layer's row pointers"),
    (changed(indptr=np.array([[1, 2, 2, 3], [0, 1, 2, 3]], np.int64)), r"field 'indptr': every layer's row pointers"),
    (changed(indptr=np.array([[0, 2, 2, 3], [0, 1, 2, 2]], np.int64)), r"field 'indptr' counts 5 entries but 'indices' has 6"),
    (changed(indptr=np.array([[0, 2, 2, 3], [0, 1, 2, 99]], np.int64)), r"field 'indptr': every layer's row pointers"),
    (changed(data=np.array([1, -2, 0, 3, 4], np.float32)), r"fields 'indices' and 'data' differ in length"),
    (changed(indices=np.array([0, 2, 1, 0, 3, 2], np.int32)), r"layer 1 indices: column indices must lie in 0..2"),
    (changed(indices=np.array([0, -2, 1, 0, 1, 2], np.int32)), r"layer 0 indices: column indices must lie in 0..2"),
    (changed(indices=np.array([2, 2, 1, 0, 1, 2], np.int32)), r"layer 0 indices: column 2 appears more than once in row 0"),
    (changed(data=np.array([1, -2, 0, 3, np.nan, 5], np.float32)), r"layer 1 data: values must be finite"),
    (changed(data=np.array([1, -2, 0, 3, 1e300, 5], np.float64)), r"layer 1 data: values must be finite"),
    (changed(biases=np.array([[0.5, -0.5, 0], [0, np.inf, -1]], np.float32)), r"field 'biases': layer 1 bias: values must be finite"),
    (changed(biases=np.zeros((2, 4), np.float32)), r"field 'biases' must have shape \(2, 3\)"),
])
def test_malformed_npz_names_file_and_field(tmp_path, arrays, match):
    path = tmp_path / "net.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(model.DataError, match=match) as err:
        model.load_network(str(path))
    assert str(path) in str(err.value)


def test_good_npz_arrays_load_with_rows_sorted(tmp_path):
    path = tmp_path / "net.npz"
    arrays = changed(indices=np.array([2, 0, 1, 0, 1, 2], np.int32), indptr=np.array([[0, 2, 2, 3], [0, 1, 2, 3]], np.int32))
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # uncompressed, int32 pointers, an unsorted row: all accepted
    net = model.load_network(str(path))
    assert net.layers[0].indices.tolist() == [0, 2, 1] and net.layers[0].data.tolist() == [-2, 1, 0]
    assert net.layers[0].indptr.dtype == np.int64 and net.ymax == 8.0


class Trap:
    """Unpickling this creates a file: proof that a reader did unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_object_arrays_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "net.npz"
    trap = np.empty(6, object)
    trap[:] = [Trap(str(marker))] * 6
    with open(path, "wb") as f:
        np.savez(f, **changed(data=trap))
    with pytest.raises(model.DataError, match=r"net.npz: field 'data' has dtype object"):
        model.load_network(str(path))
    assert not marker.exists()


def forge_member(path, key, header: dict, payload: bytes):
    """Rewrite one member of an .npz with a hand-made .npy header (magic included) and payload."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    members[f"{key}.npy"] = buf.getvalue() + payload
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)


def test_huge_declared_shapes_are_refused_before_allocation(tmp_path):
    path = tmp_path / "net.npz"
    with open(path, "wb") as f:
        np.savez(f, **good_arrays())
    forge_member(path, "data", {"descr": "<f4", "fortran_order": False, "shape": (10**13,)}, b"\0" * 24)
    with pytest.raises(model.DataError, match=r"field 'data' declares shape \(10000000000000,\) but its member holds 24 bytes"):
        model.load_network(str(path))


def test_npz_size_limit_and_broken_zips(tmp_path):
    path = tmp_path / "net.npz"
    with open(path, "wb") as f:
        np.savez_compressed(f, **good_arrays())
    assert model.read_network_npz(str(path)).n_layers == 2
    with pytest.raises(model.DataError, match=r"net.npz: the arrays declare \d+ bytes, more than the limit 100"):
        model.read_network_npz(str(path), max_bytes=100)
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.npz").write_bytes(b"1\t1\t1\n")
    for name in ("cut.npz", "text.npz"):
        with pytest.raises(model.DataError, match=rf"{name}: not a readable .npz \(zip\) file"):
            model.load_network(str(tmp_path / name))
    with pytest.raises(model.DataError, match=r"missing.npz: no such network directory or .npz file"):
        model.load_network(str(tmp_path / "missing.npz"))
    with pytest.raises(model.DataError, match=r"an .npz network holds its own biases"):
        model.load_network(str(path), bias=-0.3)


# --- from Python: scipy matrices of any format, raw CSR arrays ---

def test_from_layers_accepts_every_scipy_format_and_raw_arrays():
    weights, structure, biases, _ = make_case(seed=1, explicit_zeros=True)
    csr = [layer_csr(w, s) for w, s in zip(weights, structure)]
    want = model.Network.from_layers(csr, biases)
    assert want.nnz == sum(int(s.sum()) for s in structure) and want.ymax == 32.0
    forms = [[m.tocoo() for m in csr], [m.tocsc() for m in csr], [m.tolil() for m in csr],
             [sp.csr_array(m) for m in csr], [(m.indptr, m.indices, m.data.astype(np.float64)) for m in csr]]
    for layers in forms:
        got = model.Network.from_layers(layers, list(biases))
        for a, b in zip(got.layers, want.layers):
            for x, y in zip(a.arrays, b.arrays):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)
    # raw arrays with unsorted rows are sorted; scalars and vectors mix
    rev = [(m.indptr, np.concatenate([m.indices[m.indptr[i]:m.indptr[i + 1]][::-1] for i in range(N)]),
            np.concatenate([m.data[m.indptr[i]:m.indptr[i + 1]][::-1] for i in range(N)])) for m in csr]
    got = model.Network.from_layers(rev, [-0.5] + list(biases[1:]), ymax=4)
    np.testing.assert_array_equal(got.layers[3].indices, want.layers[3].indices)
    assert got.biases[0].tolist() == [-0.5] * N and got.ymax == 4.0


@pytest.mark.parametrize("layers, biases, ymax, match", [
    ([sp.eye(3, 4, format="csr")], 0.0, 8, r"layer 0 weights: expected shape \(3, 3\), got \(3, 4\)"),
    ([sp.eye(3, format="csr"), sp.eye(4, format="csr")], 0.0, 8, r"layer 1 weights: expected 3 rows, got 4"),
    ([([0, 1, 1, 1], [0], [np.inf])], 0.0, 8, r"layer 0 weights data: values must be finite"),
    ([([0, 2, 2, 2], [1, 1], [1.0, 2.0])], 0.0, 8, r"layer 0 weights indices: column 1 appears more than once in row 0"),
    ([([0, 1, 1, 1], [3], [1.0])], 0.0, 8, r"layer 0 weights indices: column indices must lie in 0..2"),
    ([([[0, 1]], [0], [1.0])], 0.0, 8, r"layer 0 weights indptr: expected a 1-D array"),
    ([sp.eye(3, format="csr")], [0.0, 1.0], 8, r"biases: expected 1 \(one per layer\), got 2"),
    ([sp.eye(3, format="csr")], [[0.0, np.nan, 1.0]], 8, r"layer 0 bias: values must be finite"),
    ([sp.eye(3, format="csr")], [[0.0, 1.0]], 8, r"layer 0 bias: expected a scalar or 3 values"),
    ([sp.eye(3, format="csr")], 0.0, 0, r"ymax: expected a finite positive number"),
    ([sp.eye(3, format="csr")], 0.0, 1e-50, r"ymax: expected a finite positive number"),  # 0 as float32
    ([np.eye(3)], 0.0, 8, r"layer 0 weights: expected a scipy sparse matrix"),
    ([], 0.0, 8, r"at least one layer"),
])
def test_from_layers_refuses_bad_input(layers, biases, ymax, match):
    with pytest.raises(model.DataError, match=match):
        model.Network.from_layers(layers, biases, ymax=ymax)


def test_images_from_python_and_files(case, tmp_path):
    want = sp.csr_matrix(case["x"])
    from_file = model.as_images(case["images"], N)
    assert from_file.shape == (N_IMAGES - 1, N), "a file cannot say that its last image is blank"
    from_scipy = model.as_images(want.tocoo(), N)
    assert from_scipy.shape == (N_IMAGES, N)
    for a, b in zip(from_file.arrays, from_scipy.rows(0, N_IMAGES - 1).arrays):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(model.DataError, match=r"images data: values must be finite"):
        model.as_images((np.array([0, 1]), np.array([0]), np.array([np.nan])), N)
    with pytest.raises(model.DataError, match=r"images: expected shape \(2, 37\)"):
        model.as_images(sp.csr_matrix((2, 36)), N)
    path = tmp_path / "bad.tsv"
    write_triples(path, [0, 1], [0, 3], [1.0, float("-inf")])
    with pytest.raises(model.DataError, match=r"bad.tsv, line 2, field 3: expected a finite value"):
        model.as_images(str(path), N)


# --- fsd_runtime.run: serial and distributed, against the reference ---

def test_serial_run_from_the_text_layout(case):
    result = fsd_runtime.run(case["dir"], model.read_images(case["images"], N, N_IMAGES))
    assert_matches(result, case["want"])
    assert result.workers is None and result.traffic is None and result.timings["run_s"] >= 0


@pytest.mark.parametrize("workers, launcher", [(2, "thread"), (3, "thread"), (3, "process")])
def test_distributed_run_from_the_npz_file(case, workers, launcher):
    images = sp.csr_matrix(case["x"])
    result = fsd_runtime.run(case["npz"], images, workers=workers, launcher=launcher, receive_timeout=60)
    assert_matches(result, case["want"])
    assert result.workers == workers and result.traffic["messages"] > 0


def test_run_accepts_packed_networks_and_raw_images(case):
    packed = model.load_network(case["npz"]).pack()
    m = sp.csr_matrix(case["x"])
    raw = [a.copy() for a in (m.indptr, m.indices, m.data)]
    for a in raw:
        a.flags.writeable = False  # e.g. memory-mapped inputs
    result = fsd_runtime.run(packed, tuple(raw), threads=1, batch_size=5)
    assert_matches(result, case["want"])
    assert isinstance(result.activations, fsd_kernels.Activations)


def test_run_refuses_bad_options(case):
    with pytest.raises(ValueError, match="threads applies to serial runs"):
        fsd_runtime.run(case["npz"], case["images"], workers=2, threads=2)
    with pytest.raises(ValueError, match="launcher must be one of"):
        fsd_runtime.run(case["npz"], case["images"], workers=2, launcher="lambda")
    with pytest.raises(model.DataError, match="an .npz network holds its own biases"):
        fsd_runtime.run(case["npz"], case["images"], bias=-0.3)
    with pytest.raises(TypeError, match="network must be a path"):
        fsd_runtime.run(42, case["images"])


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    """Explicit zero weights and positive biases: some sums cancel to exactly 0 where a positive
    bias lies, so the structural and the numeric bias rules give different activations."""
    weights, structure, biases, x = make_case(seed=1, explicit_zeros=True)
    npz = str(tmp_path_factory.mktemp("cancel") / "net.npz")
    net = model.Network.from_layers([layer_csr(w, s) for w, s in zip(weights, structure)], biases, ymax=YMAX)
    model.save_network(net, npz)
    want, differ = reference(weights, structure, biases, x)
    return dict(npz=npz, x=sp.csr_matrix(x), want=want, differ=differ)


def test_the_cancelling_case_really_cancels(cancelling):
    assert cancelling["differ"] > 0


@pytest.mark.parametrize("workers", [None, 2])
def test_run_with_cancelling_sums_follows_the_reference(cancelling, workers):
    result = fsd_runtime.run(cancelling["npz"], cancelling["x"], workers=workers, launcher="thread")
    assert_matches(result, cancelling["want"])


def test_cancelling_case_serial_and_distributed_agree(cancelling):
    """Whatever the bias rule, every path gives the same bits."""
    serial = fsd_runtime.run(cancelling["npz"], cancelling["x"])
    dist = fsd_runtime.run(cancelling["npz"], cancelling["x"], workers=3, launcher="thread")
    for a, b in zip(serial.activations[:3], dist.activations[:3]):
        np.testing.assert_array_equal(a, b)


# --- the package surface and the CLI ---

def run_python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, **kwargs)


def test_import_fsd_runtime_is_light_and_exports_lazily():
    code = ("import sys, fsd_runtime; heavy = [m for m in ('numpy', 'numba', 'scipy', 'boto3', 'fsd_kernels') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert {'run', 'Network', 'load_network', 'save_network'} <= set(dir(fsd_runtime)); "
            "assert fsd_runtime.run.__module__ == 'fsd_runtime.api'")
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fsd_runtime.nothing


@pytest.mark.parametrize("workers", [[], ["--workers", "3"]], ids=["serial", "3-workers"])
def test_cli_runs_an_npz_network(case, workers):
    proc = run_python("-c", "import sys; from fsd_runtime.cli import main; sys.exit(main(sys.argv[1:]))",
                      "run", "--weights", case["npz"], "--inputs", case["images"], "--json", *workers)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["categories"] == [int(c) + 1 for c in np.flatnonzero(case["want"].any(axis=1))]
    assert out["neurons"] == N and out["layers"] == L


def test_initial_status_with_blank_last_images():
    """Blank rows anywhere (also last), a full all-ymax row parked, a full row below ymax active."""
    from fsd_runtime.plan import initial_status

    y = np.float32(8)
    rows = [[], [0, 1, 2], [], [0, 2], [0, 1, 2], []]
    vals = [[], [y, y, y], [], [y, y], [y, 7.0, y], []]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    data = np.array([v for r in vals for v in r], np.float32)
    active, saturated = initial_status(indptr, data, 3, y)
    assert active.tolist() == [3, 4] and saturated.tolist() == [1]
    active, saturated = initial_status(np.zeros(4, np.int64), np.zeros(0, np.float32), 3, y)
    assert active.size == 0 and saturated.size == 0


def test_cli_reports_a_malformed_npz_by_file_and_field(case, tmp_path):
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:
        np.savez(f, **changed(ymax=np.float32(0)))
    proc = run_python("-c", "import sys; from fsd_runtime.cli import main; sys.exit(main(sys.argv[1:]))",
                      "run", "--weights", str(path), "--inputs", case["images"])
    assert proc.returncode == 2
    assert f"fsd-inference: error: {path}: field 'ymax': expected a finite positive number" in proc.stderr
