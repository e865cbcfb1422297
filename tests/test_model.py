"""Data: official file formats (round trips, clear errors), the embedded copy, the synthetic generator."""
import gzip
import io
import os
import struct
import sys
import warnings
import zipfile

import numpy as np
import pytest

import fsd_kernels
from fsd_runtime import budget, model


def write_triples(path, csr: model.Csr, gz=False, fmt="%d\t%d\t%s\n"):
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr)) + 1
    text = "".join(fmt % (r, c + 1, repr(float(v))) for r, c, v in zip(rows, csr.indices, csr.data))
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        f.write(text)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def official_files(official, tmp_path_factory):
    """The first 3 layers, 200 images and their categories, written in the official formats."""
    root = tmp_path_factory.mktemp("official")
    net_dir = root / "neuron1024"
    net_dir.mkdir()
    for k, w in enumerate(official.network.layers[:3], 1):
        write_triples(net_dir / f"n1024-l{k}.tsv{'.gz' if k == 2 else ''}", w, gz=k == 2)
    write_triples(root / "images.tsv.gz", official.images.rows(0, 200), gz=True)
    write_lines(root / "categories.tsv", [str(c + 1) for c in official.categories])
    return root


def test_official_formats_round_trip_to_the_embedded_data(official, official_files):
    ds = model.load_dataset(str(official_files / "neuron1024"), str(official_files / "images.tsv.gz"),
                            str(official_files / "categories.tsv"))
    assert ds.network.n_neurons == 1024 and ds.network.n_layers == 3
    for got, want in zip(ds.network.layers, official.network.layers):
        for a, b in zip(got.arrays, want.arrays):
            np.testing.assert_array_equal(a, b)
    assert all(np.all(b == np.float32(-0.3)) for b in ds.network.biases)
    want_images = official.images.rows(0, 200)
    assert ds.images.shape == want_images.shape
    for a, b in zip(ds.images.arrays, want_images.arrays):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ds.categories, official.categories[official.categories < 200])
    truncated = model.Network(1024, official.network.layers[:3], official.network.biases[:3])
    got = fsd_kernels.infer(*ds.images.arrays, ds.network.pack())
    want = fsd_kernels.infer(*want_images.arrays, truncated.pack())
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_array_equal(a, b)


def test_embedded_format_round_trips(tmp_path):
    ds = model.synthetic(64, 3, 20, seed=5)
    ds = model.Dataset(ds.name, ds.network, ds.images, np.array([1, 4], np.int64))
    path = tmp_path / "small.npz.xz"
    model.write_embedded(ds, str(path))
    back = model.read_embedded(str(path))
    for got, want in zip(back.network.layers, ds.network.layers):
        for a, b in zip(got.arrays, want.arrays):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(back.images.arrays, ds.images.arrays):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.categories, [1, 4])


# --- malformed files: a DataError (ValueError) naming the file, the line and what was expected ---

@pytest.mark.parametrize("lines, match", [
    (["1\t1\t0.0625", "1\t2"], r"line 2: expected 3 tab-separated fields, got 2"),
    (["1\t1\t0.0625", "1\t2\t0.5\t7"], r"line 2: expected 3 tab-separated fields, got 4"),
    (["1\tx\t0.0625"], r"line 1, field 2: expected a number, got 'x'"),
    (["1\t1\t0.5", "", "5\t1\t0.5"], r"line 3, field 1: expected an integer in 1..4, got '5'"),
    (["0\t1\t0.5"], r"line 1, field 1: expected an integer in 1..4"),
    (["1\t1.5\t0.5"], r"line 1, field 2: expected an integer in 1..4"),
    (["1\t1\tnan"], r"line 1, field 3: expected a finite value"),
    (["inf\t1\t0.5"], r"line 1, field 1: expected an integer in 1..4, got 'inf'"),
    (["1\t2\t0.5", "3\t1\t0.5", "1\t2\t0.25"], r"entry \(1, 2\) appears more than once"),
])
def test_malformed_layer_files_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "n4-l1.tsv"
    write_lines(path, lines)
    with pytest.raises(model.DataError, match=match) as err:
        model.read_network(str(tmp_path), bias=-0.3)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name, lines, where", [
    ("n4-l1.tsv", ["1\t1\t0.5", "2\t3\t1e39"], "n4-l1.tsv, line 2, field 3"),
    ("n4-l1.tsv", ["1\t1\t-3.5e38"], "n4-l1.tsv, line 1, field 3"),
    ("n4-bias.tsv", ["1\t1\t0.5", "", "2\t4\t-1e39"], "n4-bias.tsv, line 3, field 3"),
])
def test_values_beyond_float32_name_file_line_and_field(tmp_path, name, lines, where):
    if name != "n4-l1.tsv":
        write_lines(tmp_path / "n4-l1.tsv", ["1\t1\t0.5"])
    write_lines(tmp_path / "n4-l2.tsv", ["1\t1\t0.5"])
    write_lines(tmp_path / name, lines)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the cast: no "overflow encountered in cast"
        with pytest.raises(model.DataError, match=rf"{where}: expected a finite value float32 can hold"
                                                  rf" \(magnitude at most 3.402823e\+38\), got '-?\d"):
            model.read_network(str(tmp_path), bias=None if "bias" in name else 0.0)


def test_input_values_and_scalar_bias_beyond_float32_are_refused(tmp_path):
    path = tmp_path / "images.tsv"
    write_lines(path, ["1\t1\t1", "2\t2\t1e39"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(model.DataError, match=r"images.tsv, line 2, field 3: expected a finite value float32"):
            model.read_images(str(path), 4)
        write_lines(path, ["1\t1\t3.4028234663852886e38"])  # float32's largest: accepted, as is
        assert model.read_images(str(path), 4).data.tolist() == [float(np.finfo(np.float32).max)]
        write_lines(tmp_path / "n4-l1.tsv", ["1\t1\t1"])
        with pytest.raises(model.DataError, match=r"bias: expected a finite number float32 can hold, got 1e\+39"):
            model.read_network(str(tmp_path), bias=1e39)
        with pytest.raises(model.DataError, match=r"synthetic: entry \(1, 2\) is -inf, not a finite value"):
            model.from_coo([0], [1], [-np.inf], (2, 2), where="synthetic")


def test_network_directory_errors(tmp_path):
    with pytest.raises(model.DataError, match="not a directory"):
        model.read_network(str(tmp_path / "missing"))
    with pytest.raises(model.DataError, match="no layer files"):
        model.read_network(str(tmp_path))
    for k in (1, 2, 4):
        write_lines(tmp_path / f"n1024-l{k}.tsv", ["1\t1\t0.0625"])
    with pytest.raises(model.DataError, match=r"missing for layers \[3\]"):
        model.read_network(str(tmp_path))
    write_lines(tmp_path / "n1024-l3.tsv", ["1\t1\t0.0625"])
    assert model.read_network(str(tmp_path)).n_layers == 4
    write_lines(tmp_path / "n2048-l5.tsv", ["1\t1\t0.0625"])
    with pytest.raises(model.DataError, match="several widths"):
        model.read_network(str(tmp_path))


@pytest.mark.parametrize("first, second", [("n4-l1.tsv", "n4-l1.tsv.gz"), ("n4-l01.tsv", "n4-l1.tsv")])
def test_two_files_for_one_layer_are_an_error(tmp_path, first, second):
    write_lines(tmp_path / "n4-l2.tsv", ["1\t1\t1"])
    write_lines(tmp_path / first, ["1\t1\t1"])
    with gzip.open(tmp_path / second, "wt") if second.endswith(".gz") else open(tmp_path / second, "w") as f:
        f.write("2\t2\t1\n")
    for read in (model.read_network, model.stream_network):
        with pytest.raises(model.DataError, match=rf"several layer 1 files \['{first}', '{second}'\]"):
            read(str(tmp_path), bias=0.0)


def test_unknown_width_needs_a_bias(tmp_path):
    write_lines(tmp_path / "n5-l1.tsv", ["1\t1\t1"])
    with pytest.raises(model.DataError, match="no Graph Challenge bias for N=5"):
        model.read_network(str(tmp_path))
    assert model.read_network(str(tmp_path), bias=0.5).biases[0].tolist() == [0.5] * 5


def test_a_width_too_large_for_int32_ids_is_refused_before_allocation(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda: 2**60)  # memory is not what refuses it
    write_lines(tmp_path / "n3000000000-l1.tsv", ["1\t1\t1"])
    with pytest.raises(model.DataError, match=r"n3000000000-l1.tsv: N=3000000000 \(from the file name\) is "
                                              r"more neurons than int32 neuron ids can hold \(at most 2147483647\)"):
        model.stream_network(str(tmp_path), bias=0.0)


def test_a_width_whose_arrays_exceed_the_memory_available_is_refused(tmp_path, monkeypatch):
    for k in (1, 2):
        write_lines(tmp_path / f"n100-l{k}.tsv", ["1\t1\t1"])
    path = tmp_path / "n100-l1.tsv"
    # one layer read at a time: 20 bytes a neuron; both layers held: 20 + 12
    monkeypatch.setattr(budget, "available_bytes", lambda: 2500)
    assert sum(1 for _ in model.stream_network(str(tmp_path), bias=0.0).layers()) == 2
    with pytest.raises(model.DataError, match=rf"{path}: N=100 \(from the file name\) needs 0.0 GiB for the "
                                              r"per-neuron arrays alone of a net of 2 layer\(s\) \(32 bytes a neuron"):
        model.read_network(str(tmp_path), bias=0.0)
    monkeypatch.setattr(budget, "available_bytes", lambda: 1999)
    with pytest.raises(model.DataError, match=r"\(20 bytes a neuron: row pointers and biases\), more than the "
                                              r"0.0 GiB of memory available now"):
        model.stream_network(str(tmp_path), bias=0.0)
    write_lines(tmp_path / "n100-bias.tsv", ["1\t1\t1"])  # a bias file is read whole: 4 bytes a neuron and layer
    monkeypatch.setattr(budget, "available_bytes", lambda: 2700)
    with pytest.raises(model.DataError, match=r"\(28 bytes a neuron"):
        model.stream_network(str(tmp_path))
    monkeypatch.setattr(budget, "available_bytes", lambda: None)  # unknown: not checked
    assert model.read_network(str(tmp_path)).n_neurons == 100


def test_broken_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "images.tsv.gz"
    path.write_bytes(gzip.compress(b"1\t1\t1\n" * 100)[:30])
    with pytest.raises(model.DataError, match="cannot be read"):
        model.read_images(str(path), 4)


def test_corrupt_gzip_is_a_data_error(tmp_path):
    raw = bytearray(gzip.compress("".join(f"{i}\t{i % 7 + 1}\t1\n" for i in range(1, 200)).encode()))
    for i in range(20, 40):  # inside the deflate stream: zlib.error, not an OSError
        raw[i] ^= 0x55
    path = tmp_path / "images.tsv.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(model.DataError, match=r"images.tsv.gz: cannot be read \(Error -3 while decompressing"):
        model.read_images(str(path), 8)


def test_images_file_errors(tmp_path):
    path = tmp_path / "images.tsv"
    write_lines(path, ["1\t1\t1", "2\t9\t1"])
    with pytest.raises(model.DataError, match=r"images.tsv, line 2, field 2: expected an integer in 1..4"):
        model.read_images(str(path), 4)
    write_lines(path, ["1\t1\t1", "two\t1\t1"])
    with pytest.raises(model.DataError, match=r"line 2, field 1: expected a number"):
        model.read_images(str(path), 4)
    write_lines(path, ["1\t1\t1", "inf\t1\t1"])
    with pytest.raises(model.DataError, match=r"line 2, field 1: expected an integer in 1\.\.\d+, got 'inf'"):
        model.read_images(str(path), 4)


@pytest.mark.parametrize("first", ["0", "-1", "0.5"])
def test_images_file_with_no_id_of_at_least_1_names_a_real_range(tmp_path, first):
    # The image count is the largest id; when no id is >= 1 the message used to read
    # "expected an integer in 1..0" (or "1..-1"), an empty range.
    path = tmp_path / "images.tsv"
    write_lines(path, [f"{first}\t1\t1", "0\t2\t1"])
    with pytest.raises(model.DataError) as err:
        model.read_images(str(path), 4)
    message = str(err.value)
    assert "images.tsv, line 1, field 1: expected an integer in 1.." in message
    upper = int(message.split("expected an integer in 1..")[1].split(",")[0])
    assert upper >= 1, message
    assert f"got '{first}'" in message


@pytest.mark.parametrize("lines, match", [
    (["3", "x7"], r"line 2: expected a positive integer image id, got 'x7'"),
    (["0"], r"line 1: expected a positive integer image id, got '0'"),
    (["-3"], r"line 1: expected a positive integer image id"),
    (["2.5"], r"line 1: expected a positive integer image id"),
])
def test_bad_categories_file(tmp_path, lines, match):
    path = tmp_path / "categories.tsv"
    write_lines(path, lines)
    with pytest.raises(model.DataError, match=match) as err:
        model.read_categories(str(path))
    assert str(path) in str(err.value)


def test_categories_are_sorted_zero_based(tmp_path):
    path = tmp_path / "categories.tsv"
    write_lines(path, ["9", "2", "", "5"])
    assert model.read_categories(str(path)).tolist() == [1, 4, 8]


@pytest.mark.parametrize("line", ["99999999999999999999999", "9223372036854775808", "7" * 5000])
def test_categories_with_a_huge_id_are_refused(tmp_path, line):
    path = tmp_path / "categories.tsv"
    write_lines(path, ["3", line])
    with pytest.raises(model.DataError, match=rf"categories.tsv, line 2: image id '{line[:20]}.*' is too large "
                                              r"\(at most 9223372036854775807\)"):
        model.read_categories(str(path))
    write_lines(path, ["3", "0009223372036854775807"])  # the largest, leading zeros and all
    assert model.read_categories(str(path)).tolist() == [2, 2**63 - 2]


# --- the synthetic generator ---

@pytest.mark.parametrize("n", [1024, 4096, 16384, 65536])
def test_synthetic_layers_are_challenge_like(n):
    net = model.generate_network(n, 3, seed=1)
    for w, b in zip(net.layers, net.biases):
        assert np.all(np.diff(w.indptr) == 32), "32 per row"
        assert np.all(np.bincount(w.indices, minlength=n) == 32), "32 per column"
        assert np.all(np.diff(w.indices.reshape(n, 32), axis=1) > 0), "sorted, no duplicates"
        assert np.all(w.data == np.float32(1 / 16))
        assert np.all(b == np.float32(model.CHALLENGE_BIAS[n]))


def test_synthetic_first_layers_follow_the_official_rule(official):
    """For N=1024 the generator's unpermuted layers are the official layers 1-6 exactly."""
    net = model.generate_network(1024, 7, seed=0)
    for got, want in zip(net.layers[:6], official.network.layers[:6]):
        np.testing.assert_array_equal(got.indices, want.indices)
    assert not np.array_equal(net.layers[6].indices, net.layers[0].indices)
    assert sorted(map(tuple, net.layers[6].indices.reshape(-1, 32))) == \
        sorted(map(tuple, net.layers[0].indices.reshape(-1, 32))), "a row permutation of layer 1"


def test_synthetic_data_is_seeded_and_deterministic():
    a, b, c = (model.synthetic(1024, 8, 50, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.images.indices, b.images.indices)
    np.testing.assert_array_equal(a.network.layers[7].indices, b.network.layers[7].indices)
    assert not np.array_equal(a.images.indptr, c.images.indptr)
    assert not np.array_equal(a.network.layers[7].indices, c.network.layers[7].indices)


@pytest.mark.parametrize("n, layers, images", [(1024, 120, 1000), (4096, 60, 400)])
def test_some_synthetic_images_survive_deep_nets(n, layers, images):
    """Like the official data (about 3% survive), not all dead and not all alive."""
    ds = model.synthetic(n, layers, images, seed=0)
    assert 0.01 < ds.images.nnz / (n * images) < 0.2, "sparse binary inputs"
    survivors = fsd_kernels.infer(*ds.images.arrays, ds.network.pack()).categories.size
    assert 0.002 * images <= survivors <= 0.15 * images


def test_synthetic_generator_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 16"):
        model.generate_network(1000, 2)
    with pytest.raises(ValueError, match="n_layers"):
        model.generate_network(1024, 0)
    with pytest.raises(ValueError, match="n_images"):
        model.generate_images(-1, 1024)


@pytest.mark.parametrize("images", [True, False])
def test_synthetic_size_problem_names_the_nearest_sizes_that_really_generate(images):
    """Against brute force: a size fits when the generator (and, with images, the image grid)
    takes it, tried for real, and the nearest sizes named are the nearest such below and above."""
    def generates(n):
        try:
            model.stream_synthetic(n, 1)
            if images:
                model.image_grid(n)
        except ValueError:
            return False
        return True

    ok = [n for n in range(1, 4 ** 8 + 1024) if generates(n)]
    assert 256 in ok and 288 in ok and 1024 in ok and (272 in ok) == (not images)
    for n in list(range(1, 2100)) + [4 ** k + d for k in (5, 6, 7, 8) for d in (-16, -1, 1, 16)]:
        problem = model.synthetic_size_problem(n, images)
        if n in ok:
            assert problem is None, n
            continue
        below = [m for m in ok if m < n]
        above = next(m for m in ok if m > n)
        want = f"{below[-1]} or {above}" if below else str(above)
        assert problem.endswith(f"nearest: {want}"), (n, problem)
    assert model.synthetic_size_problem(10 ** 30 + 1, images)  # at once, whatever N


def test_embedded_resource_is_shipped_with_the_package():
    import fsd_runtime

    path = os.path.join(os.path.dirname(fsd_runtime.__file__), "data", model.EMBEDDED_FILE)
    assert os.path.getsize(path) < 5 * 2**20


# --- networks users bring (more in test_networks.py) ---

def test_network_carries_ymax_into_the_packed_network(official):
    layers, biases = official.network.layers[:2], official.network.biases[:2]
    assert model.Network(1024, layers, biases).ymax == 32.0 == model.YMAX == fsd_kernels.YMAX
    images = official.images.rows(0, 300)
    out32 = fsd_kernels.infer(*images.arrays, model.Network(1024, layers, biases).pack())
    packed = model.Network(1024, layers, biases, ymax=0.75).pack()
    assert packed.ymax == np.float32(0.75)
    out = fsd_kernels.infer(*images.arrays, packed)
    assert out.data.max() == np.float32(0.75) < out32.data.max(), "clipped at the network's ymax"


def test_load_dataset_reads_npz_weights_like_the_directory(official_files, tmp_path):
    directory = str(official_files / "neuron1024")
    npz = str(tmp_path / "neuron1024.npz")
    model.save_network(model.read_network(directory), npz)
    a = model.load_dataset(directory, str(official_files / "images.tsv.gz"))
    b = model.load_dataset(npz, str(official_files / "images.tsv.gz"))
    assert b.name == "neuron1024.npz" and b.network.ymax == a.network.ymax == 32.0
    for x, y in zip(a.network.layers, b.network.layers):
        for u, v in zip(x.arrays, y.arrays):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(np.stack(a.network.biases), np.stack(b.network.biases))
    with pytest.raises(model.DataError, match="an .npz network holds its own biases"):
        model.load_dataset(npz, str(official_files / "images.tsv.gz"), bias=-0.3)


def test_official_directory_with_a_bias_file_needs_no_challenge_width(tmp_path):
    write_lines(tmp_path / "n5-l1.tsv", ["1\t2\t0.5"])
    write_lines(tmp_path / "n5-l2.tsv", ["2\t1\t-0.5"])
    write_lines(tmp_path / "n5-bias.tsv", ["2\t5\t0.125", "1\t1\t-1"])
    write_lines(tmp_path / "n5-ymax.tsv", ["  4.5  "])
    net = model.read_network(str(tmp_path))
    assert net.ymax == 4.5
    assert np.stack(net.biases).tolist() == [[-1, 0, 0, 0, 0], [0, 0, 0, 0, 0.125]]


def _naive_strokes(n_images: int, n_neurons: int, seed: int, max_strokes: int = 5) -> np.ndarray:
    """The synthetic images' definition, point by point: every disk offset around every stroke
    point, clipped to the grid (the generator's loop-free wide-stroke path must draw the same)."""
    height, width = model.image_grid(n_neurons)
    scale = min(height, width) / 32
    rng = np.random.default_rng(seed)
    strokes = rng.integers(1, max_strokes + 1, n_images)
    owner = np.repeat(np.arange(n_images), strokes)
    box = np.array([height, width], np.float64) / 32
    start = rng.uniform(6, 26, (owner.size, 2)) * box
    stop = rng.uniform(6, 26, (owner.size, 2)) * box
    radius = scale * (1.0 + 0.15 * np.log2(scale)) if scale > 1 else scale
    reach = int(np.ceil(radius))
    dense = np.zeros((n_images, n_neurons), bool)
    for s in range(owner.size):
        for t in np.linspace(0.0, 1.0, int(40 * scale)):
            y, x = start[s] + (stop[s] - start[s]) * t
            for dy in range(-reach, reach + 1):
                for dx in range(-reach, reach + 1):
                    if dy * dy + dx * dx <= radius * radius:
                        yy = min(max(int(np.rint(y + dy)), 0), height - 1)
                        xx = min(max(int(np.rint(x + dx)), 0), width - 1)
                        dense[owner[s], yy * width + xx] = True
    return dense


@pytest.mark.parametrize("n_neurons, n_images", [(1024, 12), (4096, 6), (16384, 3), (65536, 2)])
def test_synthetic_images_match_the_point_by_point_definition(n_neurons, n_images):
    got = model.generate_images(n_images, n_neurons, seed=7)
    want = _naive_strokes(n_images, n_neurons, seed=7)
    dense = np.zeros_like(want)
    rows = np.repeat(np.arange(n_images), np.diff(got.indptr))
    dense[rows, got.indices] = True
    assert np.array_equal(dense, want)
    assert np.all(got.data == 1.0)


def test_synthetic_images_without_scipy_draw_the_same_pixels(monkeypatch):
    """scipy is not a runtime dependency: without it the wide-stroke path falls back to the loop."""
    with_scipy = model.generate_images(3, 16384, seed=5)
    assert model._distance_transform() is not None  # the fast path was taken above
    monkeypatch.setitem(sys.modules, "scipy.ndimage", None)  # import fails as if not installed
    assert model._distance_transform() is None
    without = model.generate_images(3, 16384, seed=5)
    for a, b in zip(with_scipy.arrays, without.arrays):
        np.testing.assert_array_equal(a, b)


# --- damaged .npz networks: a DataError naming the file (and the field), never numpy's or zipfile's own ---

def _npz_members(tmp_path) -> dict:
    """The members of a small network file as save_network writes it."""
    path = tmp_path / "good.npz"
    model.save_network(model.generate_network(64, 2, seed=1), str(path))
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _npy_header(text: bytes) -> bytes:
    """A .npy 1.0 magic and header holding ``text`` (any text: numpy's parser has to judge it)."""
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _zip(members: dict, compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", compression) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, raw in members.items() if isinstance(members, dict) else members:
            zf.writestr(name, raw)
    return buf.getvalue()


def _patch_headers(raw: bytes, local: tuple[int, int] | None, central: tuple[int, int]) -> bytes:
    """OR ``value`` into the 16-bit field at ``offset`` of every local and central zip header."""
    b = bytearray(raw)
    for magic, spot in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
        i = b.find(magic)
        while spot and i >= 0:
            offset, value = spot
            struct.pack_into("<H", b, i + offset, struct.unpack_from("<H", b, i + offset)[0] | value)
            i = b.find(magic, i + 4)
    return bytes(b)


def _damaged(kind: str, members: dict) -> bytes:
    if kind == "encrypted":  # the encrypted flag (bit 0 of the general purpose flags)
        return _patch_headers(_zip(members), (6, 1), (8, 1))
    if kind == "method 99":  # an unknown compression method
        return _patch_headers(_zip(members), (8, 99), (10, 99))
    if kind == "zip version":  # the version needed to extract, in the central directory: 21.4
        return _patch_headers(_zip(members), None, (6, 210))
    if kind == "header unbalanced":  # what a flipped byte in a header makes: tokenize.TokenError
        return _zip({**members, "indices.npy": _npy_header(b"{'descr': '<i4', 'fortran_order': False, 'shape': ((6,), }")})
    if kind.startswith("shape"):
        shape = {"shape 2**64": (2**64,), "shape 2**63": (2**63,), "shape -1": (-1,)}[kind]
        return _zip({**members, "indices.npy": _npy_header(repr({"descr": "<i4", "fortran_order": False,
                                                                  "shape": shape}).encode())})
    if kind == "member twice":
        return _zip(list(members.items()) + [("data.npy", members["data.npy"])])
    raise KeyError(kind)


@pytest.mark.parametrize("kind, match", [
    ("encrypted", r"field 'version' cannot be read, its member is damaged \(RuntimeError: .*encrypted"),
    ("method 99", r"field 'version' cannot be read, its member is damaged \(NotImplementedError: That compression"),
    ("zip version", r"not a readable .npz \(zip\) file \(NotImplementedError: zip file version 21.4\)"),
    ("header unbalanced", r"field 'indices' has no valid .npy header \(TokenError: "),
    ("shape 2**64", r"field 'indices' declares shape \(18446744073709551616,\) but its member holds 0 bytes of "
                    r"data, not 73786976294838206464$"),
    ("shape 2**63", r"field 'indices' declares shape \(9223372036854775808,\) but its member holds 0 bytes of "
                    r"data, not 36893488147419103232$"),
    ("shape -1", r"field 'indices' declares shape \(-1,\): dimensions must be integers >= 0"),
    ("member twice", r"member 'data.npy' appears more than once"),
])
def test_damaged_npz_members_are_data_errors(tmp_path, kind, match):
    path = tmp_path / "net.npz"
    path.write_bytes(_damaged(kind, _npz_members(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(model.DataError, match=match) as whole:
            model.read_network_npz(str(path))
        with pytest.raises(model.DataError, match=match) as streamed:
            for _ in model.stream_network_npz(str(path)).layers():
                pass
    for err in (whole, streamed):
        assert str(err.value).startswith(f"{path}: ")
