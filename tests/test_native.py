"""The AOT-compiled kernels (fsd_kernels._native, numba.pycc) against the numba JIT: bit-identical.

The native module is built for the host Python by ``fsd_kernels._build`` (the
same code the layer build runs in its Debian roots) and cached by the hash of
the kernel sources. A workload that calls every exported kernel through the
public API runs once per backend in a fresh process; every output array must
match bit for bit, and every exported kernel must have been called.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from fsd_kernels import _backend, _build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("fsd_kernels", "fsd_runtime")


def exported_names() -> set[str]:
    return set(_build.exported_kernels())


@pytest.fixture(scope="session")
def native_tree(native_so, tmp_path_factory) -> str:
    """A copy of the packages with the native module in fsd_kernels/, as a layer would hold them."""
    root = tmp_path_factory.mktemp("native-tree")
    for package in SOURCES:
        shutil.copytree(os.path.join(REPO, package), root / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(native_so, root / "fsd_kernels")
    return str(root)


# Runs in a fresh interpreter; argv[1] = where to save every output array.
WORKLOAD = r"""
import json, sys
import numpy as np
import fsd_kernels
from fsd_kernels import _backend, codec
from fsd_runtime import model

calls = {}
for name in [n for n in vars(_backend.kernels) if not n.startswith("_")]:
    kernel = getattr(_backend.kernels, name)
    if callable(kernel):
        def counted(*args, _kernel=kernel, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _kernel(*args)
        setattr(_backend.kernels, name, counted)

out = {}
data = model.embedded()
images = data.images.rows(0, 600)
net = data.network.pack()
for field in ("keeps_saturated",):
    out["net_" + field] = np.asarray(getattr(net, field))
act = fsd_kernels.infer(*images.arrays, net, threads=1, batch_size=128)
out["infer_indptr"], out["infer_indices"], out["infer_data"] = act.indptr, act.indices, act.data
golden = bool(np.array_equal(act.categories, data.categories[data.categories < 600]))
w = data.network.layers[0]
out["layer_indptr"], out["layer_indices"], out["layer_data"] = fsd_kernels.layer(
    *images.arrays, *w.arrays, data.network.biases[0])

rng = np.random.default_rng(7)
block = rng.random((64, 50), dtype=np.float32) * 32
block[rng.random(block.shape) < 0.6] = 0.0
block[3] = 32.0
rows = np.arange(0, 64, 2, dtype=np.int64)
neurons = np.arange(100, 100 + 3 * rows.size, 3, dtype=np.int32)
chunks = codec.encode_dense(block, rows, neurons, n_images=50, layer=3, source=1, target=2, max_bytes=400)
out["chunks"] = np.frombuffer(b"".join(chunks), np.uint8)
for i, chunk in enumerate(chunks):
    message = codec.decode(chunk)
    out[f"coo_{i}"] = np.concatenate([message.neurons, message.images, message.values.view(np.int32)])
slots = np.full(100 + 3 * rows.size, -1, np.int64)
slots[neurons] = np.arange(rows.size)
target = np.zeros((rows.size, 60), np.float32)
for chunk in chunks:
    codec.decode_into(chunk, target, slots, column_offset=5)
out["decoded_block"] = target
out["text"] = np.frombuffer(codec.to_text(chunks[0]).encode() + codec.from_text(codec.to_text(chunks[0])), np.uint8)
coo = np.zeros((16, 16), np.float32)
fsd_kernels.kernels.coo_to_block(np.array([1, 5, 9], np.int32), np.array([2, 0, 15], np.int32),
                                 np.array([0.5, -1.25, 3.0], np.float32), coo)
out["coo_block"] = coo
dense = np.zeros((1024, 40), np.float32)
n = fsd_kernels.kernels.csr_rows_to_block(*images.rows(0, 40).arrays, 0, 40, dense, np.empty(40, np.int64))
out["dense_input"] = dense[:, :n]
extracted = codec.DenseRows(block, rows, 50)
out["subset_chunk"] = np.frombuffer(extracted.encode(np.arange(1, rows.size, 2), neurons[1::2], layer=3)[0], np.uint8)
# a worker's block bookkeeping: one tracked layer, local rows in, received rows zeroed, columns dropped
colptr, rowidx, vals, bias = net.layer_csc(0)
outputs = np.zeros((1024, 40), np.float32)
top, gap = np.zeros(40, np.float32), np.zeros(40, np.float32)
fsd_kernels.kernels.dense_layer_tracked(dense, n, colptr, rowidx, vals, bias, net.ymax, outputs, top, gap)
out["tracked"], out["tracked_top"], out["tracked_gap"] = outputs, top, gap
moved = np.ones((8, 40), np.float32)
fsd_kernels.kernels.copy_rows(outputs, np.array([5, 700, 1023]), moved, np.array([0, 3, 7]), n)
fsd_kernels.kernels.zero_rows(moved, np.array([1, 2]), n)
out["moved"] = moved
wide = np.zeros((1024, 600), np.float32)
m = fsd_kernels.kernels.csr_rows_to_block(*images.rows(0, 600).arrays, 0, 600, wide, np.empty(600, np.int64))
columns = np.concatenate([np.arange(0, 256), np.arange(260, m, 3)]).astype(np.int64)  # a run, then gathers
picked = np.zeros((1024, columns.shape[0]), np.float32)
top, gap = np.zeros(600, np.float32), np.zeros(600, np.float32)
fsd_kernels.kernels.dense_layer_columns(wide, columns, colptr, rowidx, vals, bias, net.ymax, picked, top, gap)
out["picked"], out["picked_top"], out["picked_gap"] = picked, top, gap
np.savez(sys.argv[1], **out)
print(json.dumps({"backend": fsd_kernels.backend, "calls": calls, "golden": golden,
                  "numba_loaded": "numba" in sys.modules}))
"""


def run_workload(backend: str | None, pythonpath: str, out: str, **extra_env: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, **extra_env}
    env.pop("FSD_KERNELS_BACKEND", None)
    if backend:
        env["FSD_KERNELS_BACKEND"] = backend
    done = subprocess.run([sys.executable, "-c", WORKLOAD, out], env=env, capture_output=True,
                          text=True, timeout=300, cwd=pythonpath)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_native_module_exports_every_kernel(native_module):
    exported = {name for name in dir(native_module) if not name.startswith("_")}
    assert exported_names() <= exported, exported_names() - exported


def test_native_and_jit_are_bit_identical_on_every_kernel(native_tree, tmp_path):
    native = run_workload("native", native_tree, str(tmp_path / "native.npz"))
    jit = run_workload("jit", REPO, str(tmp_path / "jit.npz"))
    assert native["backend"] == "native" and jit["backend"] == "jit"
    assert native["numba_loaded"] is False, "the native path imported numba"
    for report in (native, jit):
        assert report["golden"]
        assert exported_names() <= set(report["calls"]), exported_names() - set(report["calls"])
    a, b = np.load(tmp_path / "native.npz"), np.load(tmp_path / "jit.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs between native and JIT"


def test_native_module_named_by_path_is_the_lambda_path_in_a_developer_install(native_so, tmp_path):
    """FSD_KERNELS_NATIVE: a build outside the package is loaded (no numba) and gives the JIT's bits."""
    named = run_workload(None, REPO, str(tmp_path / "named.npz"), FSD_KERNELS_NATIVE=native_so)
    jit = run_workload("jit", REPO, str(tmp_path / "jit.npz"))
    assert named["backend"] == "native" and named["numba_loaded"] is False and named["golden"]
    a, b = np.load(tmp_path / "named.npz"), np.load(tmp_path / "jit.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs between the named module and JIT"


@pytest.mark.parametrize("name, message", [("_native.so", "not a build for this Python"),
                                           ("_native" + sysconfig.get_config_var("EXT_SUFFIX"), "no such file")])
def test_a_bad_native_module_path_fails_clearly_and_never_falls_back_to_jit(tmp_path, name, message):
    if name == "_native.so":
        (tmp_path / name).write_bytes(b"not an ELF file")
    env = {**os.environ, "FSD_KERNELS_NATIVE": str(tmp_path / name)}
    env.pop("FSD_KERNELS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", "import fsd_kernels"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FSD_KERNELS_NATIVE=" in done.stderr and message in done.stderr, done.stderr[-2000:]


def test_dense_layer_native_matches_jit_on_random_blocks(native_module):
    """Direct call of both builds on awkward inputs: ragged columns, negative zeros, saturation."""
    jit = _backend._jit_namespace()
    rng = np.random.default_rng(11)
    n, width = 48, 37
    block = rng.standard_normal((n, width)).astype(np.float32) * 20
    block[rng.random(block.shape) < 0.5] = 0.0
    block[0, :5] = -0.0
    colptr = np.concatenate(([0], np.cumsum(rng.integers(0, 9, n)))).astype(np.int64)
    rowidx = np.sort(rng.integers(0, n, colptr[-1])).astype(np.int32)
    for j in range(n):  # ascending, distinct input rows per output neuron
        lo, hi = colptr[j], colptr[j + 1]
        rowidx[lo:hi] = np.sort(rng.choice(n, hi - lo, replace=False))
    vals = rng.standard_normal(colptr[-1]).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    outs = []
    for kernels in (native_module, jit):
        out = np.full((n, width), np.nan, np.float32)
        kernels.dense_layer(block, width - 3, colptr, rowidx, vals, bias, np.float32(32.0), out)
        outs.append(out)
    assert outs[0].tobytes() == outs[1].tobytes()


def test_forcing_native_without_the_module_fails_clearly(tmp_path):
    tree = tmp_path / "tree"
    for package in SOURCES:
        shutil.copytree(os.path.join(REPO, package), tree / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "FSD_KERNELS_BACKEND": "native", "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", "import fsd_kernels"], env=env, cwd=tree,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "layer.zip.sh" in done.stderr and "native" in done.stderr


def test_no_native_and_no_numba_fails_clearly(tmp_path):
    tree = tmp_path / "tree"
    for package in SOURCES:
        shutil.copytree(os.path.join(REPO, package), tree / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    code = "import sys; sys.modules['numba'] = None; import fsd_kernels"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tree)},
                          cwd=tree, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError: fsd_kernels has no usable kernels" in done.stderr


def test_unknown_backend_choice_is_a_value_error():
    env = {**os.environ, "FSD_KERNELS_BACKEND": "gpu"}
    done = subprocess.run([sys.executable, "-c", "import fsd_kernels"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "ValueError: FSD_KERNELS_BACKEND must be one of" in done.stderr


def test_glibc_versions_of_the_native_module_are_old_enough(native_so):
    versions = _build.symbol_versions(native_so)
    assert any(v.startswith("GLIBC_") for v in versions)
    assert _build.too_new(versions) == []


def test_too_new_compares_versions_numerically():
    assert _build.too_new({"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.9"}) == []
    assert _build.too_new({"GLIBC_2.38", "GLIBC_2.35", "GLIBC_2.4"}) == ["GLIBC_2.35", "GLIBC_2.38"]
    assert _build.too_new({"GLIBCXX_3.4.30", "CXXABI_1.3.13", "GCC_7.0.0"}) == ["GLIBCXX_3.4.30"]


def test_compat_stub_source_pins_each_symbol():
    source = _build.compat_source({"fmod": "GLIBC_2.2.5"}, "x86_64")
    assert ".symver __fsd_compat_fmod, fmod@GLIBC_2.2.5" in source
    assert ".hidden fmod" in source and "jmp __fsd_compat_fmod@PLT" in source
    assert "b __fsd_compat_fmodf" in _build.compat_source({"fmodf": "GLIBC_2.17"}, "aarch64")
    with pytest.raises(_build.BuildError):
        _build.compat_source({"fmod": "GLIBC_2.2.5"}, "riscv64")


def test_a_build_leaves_no_temporary_files(tmp_path, monkeypatch):
    """numba's compiler probe leaks two mkdtemp() directories a process; the build keeps them in
    its own temporary directory (here a stand-in compiler leaks the same way)."""
    import sysconfig
    import tempfile

    leaked = []

    class LeakyCompiler:
        def compile(self):
            leaked.append(tempfile.mkdtemp())  # as numba.pycc.platform._gentmpfile does
            path = tmp_path / "out" / (_build.MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
            path.write_bytes(b"")

    (tmp_path / "out").mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(_build, "_compiler", lambda out_dir, cpu, keep_dir: LeakyCompiler())
    monkeypatch.setattr(_build, "compat_pins", lambda path: {})
    _build.build(str(tmp_path / "out"), "generic")
    assert leaked and not os.path.exists(leaked[0])
    assert os.listdir(scratch) == []
    assert tempfile.tempdir == str(scratch)
