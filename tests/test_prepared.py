"""A model prepared once (fsd_runtime.prepared) and the runs that reuse it.

References: the independent scipy reference of test_differential.py on random networks, the
serial kernels (``fsd_kernels.infer``) and the golden categories on the official 1024x120 net,
and the shares the coordinator plans from the whole network (``plan.build_shares``), array for
array (the same per-layer planner runs in both: those comparisons check the streaming,
segmenting and serialisation, while the results check the planning). Memory: the preparing
process's traced peak at 60 and at 600 layers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import fsd_kernels
import fsd_runtime
from fsd_runtime import cli, model, partition, plan, prepared
from fsd_runtime.coordinator import RunError, run_distributed
from test_differential import assert_bit_identical, examples, expected, images_csr, user_networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def network_of(case) -> model.Network:
    _, layers, biases, ymax = case
    return model.Network.from_layers(layers, biases, ymax=ymax)


def assert_same(got, want):
    for a, b in zip((got.indptr, got.indices, got.data), (want.indptr, want.indices, want.data)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def reseal(path, edit=None) -> None:
    """Seal a prepared model directory again after a deliberate change, as its owner may: every
    file's sha256 recomputed, then ``edit(meta)`` applied to model.json's content, then its own
    digest recomputed (such a model the digests cannot tell from an untouched one)."""
    import hashlib

    path = os.fspath(path)
    with open(os.path.join(path, "model.json")) as f:
        meta = json.load(f)

    def sha(key):
        with open(os.path.join(path, key), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    meta["layer0_sha256"] = sha(prepared.LAYER0_KEY)
    meta["segment_sha256"] = [[sha(prepared.segment_key(w, s)) for s in range(len(meta["segments"]))]
                              for w in range(meta["n_workers"])]
    if edit is not None:
        edit(meta)
    meta["model_sha256"] = prepared.meta_digest(meta)
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(meta, f)


# --- streaming sources ---

def test_synthetic_layers_stream_as_generated_and_start_as_the_official_ones(official):
    whole = model.generate_network(1024, 40, seed=9)
    for l, (w, b) in enumerate(model.stream_synthetic(1024, 40, seed=9).layers()):
        for got, want in zip(w.arrays, whole.layers[l].arrays):
            assert np.array_equal(got, want)
        assert np.array_equal(b, whole.biases[l])
    # independent of either generator: the first log2(1024/16) = 6 layers are the official ones
    for w, off in zip(model.stream_synthetic(1024, 6, seed=3).layers(), official.network.layers[:6]):
        assert np.array_equal(w[0].indptr, off.indptr) and np.array_equal(w[0].indices, off.indices)


def _write_tsv_dir(directory, net: model.Network, bias_file: bool):
    os.makedirs(directory)
    n = net.n_neurons
    for k, w in enumerate(net.layers, 1):
        rows = np.repeat(np.arange(n), np.diff(w.indptr)) + 1
        np.savetxt(os.path.join(directory, f"n{n}-l{k}.tsv"), np.c_[rows, w.indices + 1, w.data],
                   fmt="%d\t%d\t%.9g")
    if bias_file:
        lines = [f"{l + 1}\t{j + 1}\t{b[j]:.9g}" for l, b in enumerate(net.biases) for j in range(n) if b[j]]
        with open(os.path.join(directory, f"n{n}-bias.tsv"), "w") as f:
            f.write("\n".join(lines) + "\n")


def test_network_files_stream_to_the_same_hash_as_read_whole(tmp_path):
    rng = np.random.default_rng(4)
    n, L = 48, 5
    layers = [sp.random(n, n, density=0.2, random_state=rng, format="csr", dtype=np.float32) -
              sp.random(n, n, density=0.1, random_state=rng, format="csr", dtype=np.float32) for _ in range(L)]
    net = model.Network.from_layers(layers, [rng.uniform(-1, 1, n).astype(np.float32) for _ in range(L)], ymax=8.0)
    npz = str(tmp_path / "net.npz")
    model.save_network(net, npz)
    _write_tsv_dir(str(tmp_path / "dir"), model.load_network(npz), bias_file=True)
    (tmp_path / "dir" / f"n{n}-ymax.tsv").write_text("8\n")
    want = prepared.network_hash(net.pack())
    assert prepared.network_hash(npz) == prepared.network_hash(str(tmp_path / "dir")) == want
    streamed = list(model.stream_network(npz).layers())
    whole = model.load_network(npz)
    for (w, b), ww, wb in zip(streamed, whole.layers, whole.biases):
        assert all(np.array_equal(x, y) for x, y in zip(w.arrays, ww.arrays)) and np.array_equal(b, wb)
    other = model.Network.from_layers(layers, [np.zeros(n, np.float32)] * L, ymax=8.0)
    assert prepared.network_hash(other) != want


def test_a_truncated_npz_fails_while_streaming_with_a_clear_error(tmp_path):
    net = model.generate_network(64, 4)
    path = str(tmp_path / "net.npz")
    np.savez(path, version=np.int64(1), n_neurons=np.int64(64), ymax=np.float32(32),
             indptr=np.stack([w.indptr for w in net.layers]),
             indices=np.concatenate([w.indices for w in net.layers])[:-5],
             data=np.concatenate([w.data for w in net.layers])[:-5], biases=np.stack(net.biases))
    out = tmp_path / "model"
    with pytest.raises(model.DataError, match="net.npz"):
        prepared.prepare(path, str(out), 2)
    assert not out.exists(), "a failed prepare leaves nothing behind"


# --- prepared shares are the planned shares; prepared runs equal the references ---

@examples(25)
@given(user_networks(max_n=30, max_layers=6), st.integers(1, 6), st.sampled_from(["contiguous", "hypergraph"]),
       st.sampled_from([1, 5000, 2**26]))
def test_prepared_shares_equal_the_planned_shares(tmp_path_factory, case, n_workers, method, segment_bytes):
    n_workers = min(n_workers, case[0].shape[1])
    net = network_of(case)
    packed = net.pack()
    out = tmp_path_factory.mktemp("prep") / "m"
    meta = prepared.prepare(net, str(out), n_workers, partition=method, segment_bytes=segment_bytes)
    assert meta["network_hash"] == prepared.network_hash(packed)
    assert meta["keeps_saturated"] == [bool(k) for k in packed.keeps_saturated]
    images = images_csr(case[0])
    shares = plan.build_shares(packed, *images, partition.make_partition(packed, n_workers, method), n_workers)
    found = prepared.open_model(str(out))
    in0 = prepared.layer0_inputs(found)
    active, saturated = plan.initial_status(images[0], images[2], packed.n_neurons, packed.ymax)
    for w in range(n_workers):
        got = prepared.load_worker_share(found, prepared.inputs_share(found, w, in0[w], images, active, saturated), w)
        assert got.to_bytes() == shares[w].to_bytes()


@examples(25)
@given(user_networks(max_n=30, max_layers=5), st.integers(1, 7), st.sampled_from(["contiguous", "hypergraph"]),
       st.sampled_from([None, 2]))
def test_prepared_run_equals_the_reference(tmp_path_factory, case, n_workers, method, batch_size):
    n_workers = min(n_workers, case[0].shape[1])
    want = expected(case)
    out = str(tmp_path_factory.mktemp("prep") / "m")
    prepared.prepare(network_of(case), out, n_workers, partition=method, segment_bytes=3000)
    result = fsd_runtime.run(None, sp.csr_matrix(case[0]), prepared=out, batch_size=batch_size, launcher="thread")
    assert result.workers == n_workers
    assert_bit_identical(result.activations, want, f"P={n_workers} {method}")


def test_prepared_official_run_with_process_workers_equals_serial(tmp_path, official, official_packed):
    out = str(tmp_path / "official")
    meta = prepared.prepare("embedded", out, 4, segment_bytes=4 * 2**20)
    assert (meta["n_neurons"], meta["n_layers"], meta["n_workers"]) == (1024, 120, 4)
    assert len(meta["segments"]) > 1 and meta["name"] == "graphchallenge-1024x120"
    assert meta["network_hash"] == prepared.network_hash(official_packed)
    images = official.images.rows(0, 2000)
    serial = fsd_kernels.infer(*images.arrays, official_packed)
    # the network given too: its hash is checked against the model's
    result = run_distributed(official_packed, images.arrays, prepared=out, launcher={"kind": "process"})
    assert_same(result.activations, serial)
    assert np.array_equal(result.categories, official.categories[official.categories < 2000])
    assert result.n_workers == 4 and result.partition == "hypergraph" and result.timings["partition_s"] < 1
    assert sorted(os.listdir(out)) == ["layer0.npz", "model.json", "workers"], "runs leave the model as it was"


# --- memory: bounded in the number of layers ---

_PROBE = """
import json, os, sys, tempfile, tracemalloc
from fsd_runtime import prepared
peaks = {}
with tempfile.TemporaryDirectory(prefix="prepare-probe-") as d:
    prepared.prepare("synthetic:1024x4:0", os.path.join(d, "warm"), 4)  # imports, kernels, caches
    tracemalloc.start()
    for layers in (60, 600):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        meta = prepared.prepare(f"synthetic:1024x{layers}:0", os.path.join(d, str(layers)), 4,
                                segment_bytes=2**20)
        peaks[layers] = [tracemalloc.get_traced_memory()[1] - base, len(meta["segments"])]
print(json.dumps(peaks))
"""


def test_preparing_memory_does_not_grow_with_layers():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    peaks = {int(k): v for k, v in json.loads(done.stdout).items()}
    (peak60, segs60), (peak600, segs600) = peaks[60], peaks[600]
    assert segs600 >= 10 * segs60 - 10, "both runs close segments at the same size"
    # 600 layers of 1024 neurons are about 160 MB of weights and plans; the whole network
    # held would be tens of MB above the 60-layer peak. Bounded: within 20% (and 1 MB).
    assert peak600 <= 1.2 * peak60 + 2**20, peaks
    assert peak600 < 16 * 2**20, peaks


# --- refusals: one clear line, nothing run ---

@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("small") / "m")
    prepared.prepare("synthetic:256x8:1", out, 3)
    return out


def test_runs_refuse_a_model_that_is_not_the_one_asked_for(small_model):
    ds = model.synthetic(256, 8, 20, seed=1)
    with pytest.raises(prepared.PreparedError, match="prepared for 3 workers, the run asks for 2"):
        run_distributed(None, ds.images.arrays, 2, prepared=small_model)
    with pytest.raises(prepared.PreparedError, match="partitioned by hypergraph"):
        run_distributed(None, ds.images.arrays, prepared=small_model, partition="contiguous")
    other = model.generate_network(256, 8, seed=2).pack()
    with pytest.raises(prepared.PreparedError, match="another network"):
        run_distributed(other, ds.images.arrays, prepared=small_model)
    with pytest.raises(prepared.PreparedError, match="another network"):
        fsd_runtime.run("synthetic:256x8:2", ds.images, prepared=small_model)
    with pytest.raises(ValueError, match=r"images column indices must lie in \[0, 256\)"):
        run_distributed(None, model.synthetic(1024, 1, 5).images.arrays, prepared=small_model)


def test_incomplete_or_tampered_models_are_refused(tmp_path, small_model):
    import shutil

    with pytest.raises(prepared.PreparedError, match="no such prepared model directory"):
        prepared.open_model(str(tmp_path / "none"))
    copy = tmp_path / "copy"
    shutil.copytree(small_model, copy)
    (copy / "model.json").unlink()
    with pytest.raises(prepared.PreparedError, match="no model.json"):
        prepared.open_model(str(copy))
    (copy / "model.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past the parser's depth
    with pytest.raises(prepared.PreparedError, match="not JSON"):
        prepared.open_model(str(copy))
    shutil.rmtree(copy)
    shutil.copytree(small_model, copy)
    # model.json's fields are checked also in a model re-sealed after an edit (digests recomputed)
    reseal(copy, lambda meta: meta["segments"][0].__setitem__(1, meta["segments"][0][1] + 1))
    with pytest.raises(prepared.PreparedError, match="segments"):
        prepared.open_model(str(copy))
    for field, bad in (("worker_sizes", [{"share_bytes": 1}]), ("worker_sizes", "many"),
                       ("most_edges", -1), ("most_edges", "9"), ("name", 7), ("ymax", -1.0),
                       ("segment_sha256", [["0" * 64]])):
        shutil.rmtree(copy)
        shutil.copytree(small_model, copy)
        reseal(copy, lambda meta: meta.__setitem__(field, bad))
        with pytest.raises(prepared.PreparedError, match=field):
            prepared.open_model(str(copy))
    shutil.rmtree(copy)
    shutil.copytree(small_model, copy)
    segment = copy / "workers" / "1" / "seg-00000.npz"
    z = dict(np.load(segment))
    z["rowidx"] = z["rowidx"] + 10**6  # indices no kernel may follow, in a model re-sealed after the edit
    np.savez(segment, **z)
    reseal(copy)
    ds = model.synthetic(256, 8, 20, seed=1)
    with pytest.raises(RunError, match="worker 1.*rowidx"):
        run_distributed(None, ds.images.arrays, prepared=str(copy), launcher={"kind": "thread"})
    with pytest.raises(prepared.PreparedError, match="not an empty directory"):
        prepared.prepare("synthetic:256x2", small_model, 2)


# --- a model's files changed after prepare: refused by their sha256 in model.json ---

def _edit_segment(path, worker, segment, change):
    """Rewrite a segment with ``change(arrays)`` applied, its meta (worker, layers...) intact."""
    from fsd_runtime.storage import pack_arrays

    key = os.path.join(path, prepared.segment_key(worker, segment))
    with np.load(key) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    with open(key, "wb") as f:
        f.write(pack_arrays(arrays))


def _edit_json(path, change):
    meta = json.loads((path / "model.json").read_text())
    change(meta)
    (path / "model.json").write_text(json.dumps(meta))


def _edit_layer0(path):
    """Worker 0 loses its last layer-0 input neuron: still ascending and in range."""
    from fsd_runtime.storage import pack_arrays

    with np.load(path / prepared.LAYER0_KEY) as z:
        arrays = {k: z[k] for k in z.files}
    cut = int(arrays["ptr"][1]) - 1
    arrays["in_neurons"] = np.delete(arrays["in_neurons"], cut)
    arrays["ptr"] = np.concatenate([arrays["ptr"][:1], arrays["ptr"][1:] - 1])
    (path / prepared.LAYER0_KEY).write_bytes(pack_arrays(arrays))


@pytest.fixture(scope="module")
def live_model(tmp_path_factory):
    """A model whose run keeps images alive to the end (27 categories of 60 images), of one
    segment (read whole by each worker) and of a segment a layer (read as the run needs them)."""
    base = tmp_path_factory.mktemp("live")
    prepared.prepare("synthetic:1024x4:1", str(base / "whole"), 3)
    prepared.prepare("synthetic:1024x4:1", str(base / "segmented"), 3, segment_bytes=1)
    return base


LIVE_ARGS = ["--synthetic", "1024x4", "--seed", "1", "--images", "60", "--json"]


def _live_images():
    ds = model.synthetic(1024, 4, 60, seed=1)
    return ds.images.arrays, fsd_kernels.infer(*ds.images.arrays, ds.network.pack())


#: (what is changed, the change, the file the refusal names)
TAMPERED = {
    "segment weights x4": (lambda p: _edit_segment(p, 1, 0, lambda a: a.update(vals=a["vals"] * 4)),
                           "workers/1/seg-00000.npz does not match model.json's segment_sha256"),
    "segment bias +5": (lambda p: _edit_segment(p, 0, 0, lambda a: a.update(bias=a["bias"] + 5)),
                        "workers/0/seg-00000.npz does not match model.json's segment_sha256"),
    "segment NaN weight": (lambda p: _edit_segment(p, 2, 0, lambda a: a["vals"].__setitem__(0, np.nan)),
                           "workers/2/seg-00000.npz does not match model.json's segment_sha256"),
    "model.json ymax": (lambda p: _edit_json(p, lambda m: m.update(ymax=0.25)),
                        "model.json does not match its model_sha256"),
    "layer0.npz": (_edit_layer0, "layer0.npz does not match model.json's layer0_sha256"),
}


@pytest.mark.parametrize("which", ["whole", "segmented"])
def test_an_untouched_model_copied_elsewhere_runs_bit_identical(capsys, tmp_path, live_model, which):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(live_model / which, copy)
    images, serial = _live_images()
    assert len(serial.categories) == 27
    result = run_distributed(None, images, prepared=str(copy), launcher={"kind": "thread"})
    assert_same(result.activations, serial)
    assert cli.main(["run", "--prepared", str(copy), *LIVE_ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["categories"] == [int(c) + 1 for c in serial.categories]


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_file_changed_after_prepare_is_refused_naming_it(capsys, tmp_path, live_model, case):
    """Before the digests, each of these ran unchecked to exit 0 (the changed weights, bias and
    ymax with wrong activations and categories)."""
    import shutil

    change, message = TAMPERED[case]
    copy = tmp_path / "copy"
    shutil.copytree(live_model / "whole", copy)
    change(copy)
    images, _ = _live_images()
    with pytest.raises(prepared.PreparedError, match=message) as refused:
        run_distributed(None, images, prepared=str(copy), launcher={"kind": "thread"})
    assert "prepare the model again" in str(refused.value)
    if case.startswith("segment"):  # found by the worker that reads it: a failed run, of bad data
        assert isinstance(refused.value, RunError) and "ModelFileError" in str(refused.value)
    assert cli.main(["run", "--prepared", str(copy), *LIVE_ARGS]) == cli.EXIT_USAGE
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and not captured.out


def test_a_changed_segment_read_late_is_refused_by_its_worker(capsys, tmp_path, live_model):
    """A model of a segment a layer: worker 2's last segment, read when the run reaches it."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(live_model / "segmented", copy)
    assert len(prepared.open_model(str(copy)).meta["segments"]) == 4
    _edit_segment(copy, 2, 3, lambda a: a.update(bias=a["bias"] - 1))
    images, _ = _live_images()
    message = "worker 2: ModelFileError: prepared model segment .*workers/2/seg-00003.npz does not match"
    with pytest.raises(prepared.PreparedError, match=message):
        run_distributed(None, images, prepared=str(copy), launcher={"kind": "thread"})
    assert cli.main(["run", "--prepared", str(copy), *LIVE_ARGS]) == cli.EXIT_USAGE
    assert "workers/2/seg-00003.npz does not match" in capsys.readouterr().err


def test_non_finite_weights_or_bias_in_a_resealed_segment_are_refused(capsys, tmp_path, live_model):
    """Defence in depth: a segment re-sealed with a NaN weight or an infinite bias (its digest
    then matches) is refused when parsed, as a serial run refuses such a network."""
    import shutil

    images, _ = _live_images()
    for name, what in (("vals", "weights"), ("bias", "bias")):
        copy = tmp_path / name
        shutil.copytree(live_model / "whole", copy)
        _edit_segment(copy, 1, 0, lambda a: a[name].__setitem__(-1, np.nan if name == "vals" else np.inf))
        reseal(copy)
        message = f"worker 1: ModelFileError: .*seg-00000.npz: layer 3 {what} values must be finite"
        with pytest.raises(prepared.PreparedError, match=message):
            run_distributed(None, images, prepared=str(copy), launcher={"kind": "thread"})
        assert cli.main(["run", "--prepared", str(copy), *LIVE_ARGS]) == cli.EXIT_USAGE
        captured = capsys.readouterr()
        assert f"{what} values must be finite" in captured.err and "Traceback" not in captured.err


def test_a_model_json_without_digests_is_refused_asking_to_prepare_again(capsys, tmp_path, small_model):
    import shutil

    def without_digests(meta, version):
        for key in ("model_sha256", "layer0_sha256", "segment_sha256"):
            del meta[key]
        meta["version"] = version

    for version, message in ((1, "format version 1, made by an older fsd-inference"),
                             (prepared.VERSION, "model.json lacks its sha256 digests")):
        copy = tmp_path / f"v{version}"
        shutil.copytree(small_model, copy)
        _edit_json(copy, lambda meta: without_digests(meta, version))
        with pytest.raises(prepared.PreparedError, match=f"{message}.*prepare the model again"):
            prepared.open_model(str(copy))
        assert cli.main(["run", "--prepared", str(copy), "--synthetic", "256x8", "--seed", "1"]) == cli.EXIT_USAGE
        captured = capsys.readouterr()
        assert message in captured.err and "prepare the model again" in captured.err
        assert "Traceback" not in captured.err


def test_publishing_checks_every_file_before_it_uploads(tmp_path, small_model):
    """A model uploaded to a shared store (what an S3 run does) is checked file by file as
    copied: a changed one is not uploaded for later runs to reuse."""
    import shutil

    from fsd_runtime.storage import LocalStorage

    shared = LocalStorage(str(tmp_path / "shared"))
    there, uploaded = prepared.publish(prepared.open_model(small_model), shared)
    assert uploaded and there.meta == prepared.open_model(small_model).meta
    copy = tmp_path / "copy"
    shutil.copytree(small_model, copy)
    _edit_segment(copy, 1, 0, lambda a: a.update(vals=-a["vals"]))
    other = LocalStorage(str(tmp_path / "other"))
    with pytest.raises(prepared.PreparedError, match="workers/1/seg-00000.npz does not match"):
        prepared.publish(prepared.open_model(str(copy)), other)
    assert not [k for k in other.list("models") if k.endswith(prepared.MODEL_KEY)]


# --- the CLI ---

def test_cli_prepare_then_run_prepared(capsys, tmp_path, official):
    out = str(tmp_path / "m")
    assert cli.main(["prepare", "--out", out, "--workers", "3", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert (meta["n_workers"], meta["n_layers"], meta["partition"]) == (3, 120, "hypergraph")
    assert cli.main(["run", "--prepared", out, "--images", "800", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["golden_match"] is True and result["workers"] == 3 and result["mode"] == "distributed"
    assert result["categories"] == [int(c) + 1 for c in official.categories if c < 800]
    for argv, message in (
            (["--workers", "2"], "prepared for 3 workers, the run asks for 2"),
            (["--partition", "contiguous"], "partitioned by hypergraph, the run asks for contiguous"),
            (["--synthetic", "1024x120", "--images", "5"], "prepared from another network"),
            (["--synthetic", "256x120"], "a network of 1024 neurons, --synthetic has 256")):
        assert cli.main(["run", "--prepared", out, *argv]) == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fsd-inference: error: --prepared") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)


def test_cli_prepare_refuses_bad_options_with_exit_2(capsys, tmp_path, small_model):
    for argv, message in (
            (["--out", small_model, "--workers", "2"], "not an empty directory"),
            (["--out", str(tmp_path / "a"), "--workers", "2", "--seed", "3"], "--seed applies to --synthetic"),
            (["--out", str(tmp_path / "b"), "--workers", "2", "--weights", str(tmp_path / "none")],
             "no such file"),
            (["--out", str(tmp_path / "c"), "--workers", "300"], "at most"),
            (["--out", str(tmp_path / "d"), "--workers", "40", "--synthetic", "32x2"], "40 workers for 32 neurons")):
        try:
            code = cli.main(["prepare", *argv])
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        assert code == cli.EXIT_USAGE, argv
        assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")
    assert cli.main(["run", "--prepared", str(tmp_path / "none")]) == cli.EXIT_USAGE
    assert "no such directory" in capsys.readouterr().err


# --- S3: the model uploaded once, reused by later runs ---

def test_s3_runs_upload_the_model_once_and_reuse_it(capsys, aws_server, small_model):
    from fsd_runtime.aws import deploy
    from fsd_runtime.aws.clients import AwsSettings, client
    from fsd_runtime.aws.run import AwsRun, RunOptions

    settings = AwsSettings(region="us-east-1", endpoint_url=aws_server.endpoint_url)
    assert settings.endpoint_url.startswith("http://127.0.0.1:")
    name = f"fsd-prep-{uuid.uuid4().hex[:6]}"
    deploy.deploy(deploy.DeploySettings(name=name, topics=1, lambda_function=False), settings)
    try:
        ds = model.synthetic(256, 8, 60, seed=1)
        serial = fsd_kernels.infer(*ds.images.arrays, ds.network.pack())
        uploaded = []
        for _ in range(2):
            with AwsRun(RunOptions(channel="object", invoker="local", deployment=name, aws=settings), 3) as aws_run:
                result = run_distributed(None, ds.images.arrays, prepared=small_model,
                                         channel=aws_run.channel_config(), launcher=aws_run.launcher_config(),
                                         storage=aws_run.storage, run_timeout=240)
            assert_same(result.activations, serial)
            uploaded.append(result.timings["model_uploaded"])
            segments = len(prepared.open_model(small_model).meta["segments"])
            assert result.traffic["model_gets_per_worker"] == [2 + segments] * 3  # one segment: read whole
        assert uploaded == [True, False]
        bucket = deploy.names_for(deploy.DeploySettings(name=name), settings).bucket
        keys = [o["Key"] for o in client("s3", settings).list_objects_v2(Bucket=bucket).get("Contents", [])]
        digest = prepared.model_digest(prepared.open_model(small_model).meta)
        assert keys and all(k.startswith(f"models/{digest}/") for k in keys), keys  # the runs' objects are gone
        assert len(keys) == len([f for _, _, fs in os.walk(small_model) for f in fs])
        # later runs name the uploaded model alone: the CLI, and the Lambda coordinator's mode
        from fsd_runtime.aws.coordinate import coordinate

        want = [int(c) + 1 for c in serial.categories]
        out = coordinate({"prepared": f"s3:models/{digest}", "channel": "object", "invoker": "local",
                          "deployment": name, "synthetic": "256x8", "seed": 1, "images": 60})
        assert out["categories"] == want and out["prepared_model"] == f"s3:models/{digest}" and out["workers"] == 3
        with pytest.raises(ValueError, match="must be s3:PREFIX"):
            coordinate({"prepared": small_model, "channel": "object", "deployment": name})
        with pytest.raises(ValueError, match="another network"):
            coordinate({"prepared": f"s3:models/{digest}", "channel": "object", "invoker": "local",
                        "deployment": name, "synthetic": "256x8", "seed": 2, "images": 5})
        with pytest.raises(ValueError, match="asks 3 workers"):  # the model's worker count, within the limits
            coordinate({"prepared": f"s3:models/{digest}", "channel": "object", "deployment": name},
                       {"deployment": name, "max_workers": 2, "max_fanout": 16})
        keys_after = [o["Key"] for o in client("s3", settings).list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys_after == keys, "nothing uploaded again, nothing of the runs left"
        assert cli.main(["run", "--prepared", "s3:models/nothing-here", "--channel", "object",
                         "--deployment", name, "--synthetic", "256x8"]) == cli.EXIT_USAGE
        # a segment changed in the bucket after the upload: its worker refuses it, naming it
        from fsd_runtime.storage import pack_arrays

        with np.load(os.path.join(small_model, prepared.segment_key(1, 0))) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["vals"] = arrays["vals"] * 4
        client("s3", settings).put_object(Bucket=bucket, Key=f"models/{digest}/{prepared.segment_key(1, 0)}",
                                          Body=pack_arrays(arrays))
        capsys.readouterr()
        assert cli.main(["run", "--prepared", f"s3:models/{digest}", "--channel", "object", "--invoker", "local",
                         "--deployment", name, "--synthetic", "256x8", "--seed", "1", "--images", "60"]) == \
            cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"worker 1: ModelFileError: prepared model segment s3 store/models/{digest}/workers/1/seg-00000.npz " \
               "does not match model.json's segment_sha256" in err and "Traceback" not in err, err
    finally:
        deploy.teardown(deploy.DeploySettings(name=name, topics=1), settings)


@pytest.fixture(scope="module")
def segmented_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("segmented") / "m")
    prepared.prepare("synthetic:256x8:1", out, 3, segment_bytes=1)  # a segment a layer: read as needed
    return out


@pytest.mark.parametrize("which", ["whole", "segmented"])
def test_a_prepared_s3_run_prices_the_model_reads_and_bytes_its_workers_make(aws, small_model, segmented_model,
                                                                             which):
    """Every S3 GET-class request of a prepared run (HEADs included, as S3 bills them) is priced
    as counted at the server, the workers' reads of model.json and their segments among them;
    each worker's modelled share download includes the bytes of the segment objects it read
    (all of a one-segment model; of a segmented one, those its run needed)."""
    small_model = small_model if which == "whole" else segmented_model
    from fsd_runtime.aws import cost, deploy
    from fsd_runtime.aws.clients import AwsSettings
    from fsd_runtime.aws.run import AwsRun, RunOptions

    settings = AwsSettings(region="us-east-1", endpoint_url=aws.endpoint_url)
    name = f"fsd-prep-{uuid.uuid4().hex[:6]}"
    deploy.deploy(deploy.DeploySettings(name=name, topics=1, lambda_function=False), settings)
    try:
        ds = model.synthetic(256, 8, 60, seed=1)
        with AwsRun(RunOptions(channel="queue", invoker="local", deployment=name, aws=settings), 3) as aws_run:
            aws.requests.clear()  # the run's requests only, workers' (threads here) and coordinator's
            result = run_distributed(None, ds.images.arrays, prepared=small_model,
                                     channel=aws_run.channel_config(), launcher={"kind": "thread"},
                                     storage=aws_run.storage, run_timeout=240)
            made = aws.requests["GetObject"] + aws.requests["HEADObject"] + aws.requests["HEADBucket"]
            out = aws_run.cost(result.traffic, result.metrics, 60)
            _, inputs = aws_run._sizes("shares")
        assert aws.requests["HEADObject"] > 0
        assert out["billed_requests"]["s3_get"] == made
        n_segments = len(prepared.open_model(small_model).meta["segments"])
        read = [m["model_reads"]["segments"] if which == "segmented" else list(range(n_segments))
                for m in result.worker_metrics]
        assert which == "whole" or any(len(r) < n_segments for r in read), "the run ends early: not all read"
        segments = [sum(os.path.getsize(os.path.join(small_model, prepared.segment_key(w, i))) for i in read[w])
                    for w in range(3)]
        assert result.traffic["model_bytes_per_worker"] == segments
        for preset_name, preset in cost.PRESETS.items():
            want = sum(preset.s3_request_s + (inputs[w] + segments[w]) / 1e6 / preset.s3_mb_per_s for w in range(3))
            got = out["duration_terms"][preset_name]["seconds"]["share_download_s"]
            assert got == pytest.approx(want, rel=1e-9)
        if which == "segmented":
            return
        # a model prepared before the segments' sizes were recorded: its plans' array bytes
        old = prepared.open_model(small_model)
        old.meta["worker_sizes"] = [{k: v for k, v in s.items() if k != "stored_bytes"}
                                    for s in old.meta["worker_sizes"]]
        assert prepared.worker_bytes(old) == [s["share_bytes"] for s in old.meta["worker_sizes"]]
        assert all(0 < s["share_bytes"] < seg for s, seg in zip(old.meta["worker_sizes"], segments))
    finally:
        deploy.teardown(deploy.DeploySettings(name=name, topics=1), settings)


def test_a_coordinator_event_for_another_deployment_is_refused_before_reading_the_model(aws):
    """Inside a deployed function, an event naming another deployment (or invoker) is refused
    before any AWS call: no model.json of any bucket is read (here there is no model at all)."""
    from fsd_runtime.aws.coordinate import coordinate

    limits = {"deployment": "fsd-mine", "max_workers": 8, "max_fanout": 4}
    for options in ({"deployment": "fsd-other"}, {"deployment": "fsd-mine", "invoker": "local"}):
        with pytest.raises(ValueError, match="runs only --invoker lambda on that deployment"):
            coordinate({"prepared": "s3:models/nothing-here", "channel": "object", **options}, limits)
    assert not aws.requests, dict(aws.requests)


# --- the worker event's model field ---

def _event(**model):
    from fsd_runtime import events

    return {"run_id": "r1", "worker_id": 0, "n_workers": 2, "fanout": 2, "prefix": "runs/r1",
            "storage": {"kind": "s3", "bucket": "the-bucket"}, "channel": {"kind": "object", "bucket": "the-bucket"},
            "launcher": {"kind": "lambda", "function": "fn"}, "version": events.EVENT_VERSION, **model}


def test_the_event_names_a_model_checked_like_every_field():
    from fsd_runtime import events
    from fsd_runtime.aws.handler import check_deployed_event

    assert events.parse(_event()).model is None
    parsed = events.parse(_event(model={"prefix": "models/abc"}))
    assert parsed.model == {"prefix": "models/abc"} and events.parse(parsed.to_json()).model == parsed.model
    for bad in ({"prefix": "../x"}, {"prefix": "/abs"}, {"prefix": "m", "other": 1}, "models/abc",
                {"prefix": "m", "storage": {"root": "/x"}}):
        with pytest.raises(events.EventError, match="model"):
            events.parse(_event(model=bad))
    limits = {"deployment": "d", "bucket": "the-bucket", "max_workers": 8, "max_fanout": 4, "function": "fn",
              "endpoint_url": None}
    check_deployed_event(events.parse(_event(model={"prefix": "models/abc"})), limits)
    check_deployed_event(events.parse(_event(model={"prefix": "m", "storage": {"kind": "s3", "bucket": "the-bucket"}})),
                         limits)
    for storage in ({"kind": "local", "root": "/tmp/x"}, {"kind": "s3", "bucket": "another"}):
        with pytest.raises(events.EventError, match="prepared model must be in the deployment's bucket"):
            check_deployed_event(events.parse(_event(model={"prefix": "m", "storage": storage})), limits)


def test_prepare_into_a_store_prefix_and_run_from_there(tmp_path):
    from fsd_runtime.storage import LocalStorage

    store = LocalStorage(str(tmp_path / "store"))
    store.put("other/keep.txt", b"not the model's")
    meta = prepared.prepare("synthetic:256x6:4", (store, "models/m1"), 2, partition="contiguous")
    found = prepared.open_model(store, "models/m1")
    assert found.meta["network_hash"] == meta["network_hash"] and found.partition == "contiguous"
    with pytest.raises(prepared.PreparedError, match="already holds objects"):
        prepared.prepare("synthetic:256x6:4", (store, "models/m1"), 2)
    ds = model.synthetic(256, 6, 40, seed=4)
    result = run_distributed(None, ds.images.arrays, prepared=found, launcher={"kind": "thread"})
    assert_same(result.activations, fsd_kernels.infer(*ds.images.arrays, ds.network.pack()))
    assert store.get("other/keep.txt") == b"not the model's"


def test_a_prepared_model_sizes_its_workers_like_the_planned_shares(tmp_path):
    """The footprint a run of a prepared model batches by (from model.json and the images,
    without reading the weights) is the planned shares' footprint, byte for byte, with some
    images empty (neither active nor saturated)."""
    from fsd_runtime import budget

    ds = model.synthetic(512, 12, 300, seed=3)
    net = ds.network.pack()
    out = str(tmp_path / "m")
    prepared.prepare(ds.network, out, 5)
    indptr, indices, data = ds.images.arrays
    x = sp.csr_matrix((data, indices, indptr), shape=(300, 512))
    x = sp.diags(np.isin(np.arange(300), [3, 77, 150, 299], invert=True).astype(np.float32)) @ x
    x.eliminate_zeros()
    x.sort_indices()
    indptr, indices, data = x.indptr.astype(np.int64), x.indices.astype(np.int32), x.data.astype(np.float32)
    assert np.count_nonzero(np.diff(indptr) == 0) >= 4
    owners = partition.make_partition(net, 5, "hypergraph")
    planned = [budget.footprint(s) for s in plan.build_shares(net, indptr, indices, data, owners, 5)]
    got = prepared.footprints(prepared.open_model(out), indptr, indices)
    for fp, want in zip(got, planned):
        assert (fp.in_rows, fp.out_rows, fp.last_rows, fp.n_images, fp.map_bytes) == \
            (want.in_rows, want.out_rows, want.last_rows, want.n_images, want.map_bytes)
        assert fp.share_bytes == want.share_bytes


def test_a_prepared_run_under_a_small_budget_runs_in_batches_bit_identical(tmp_path):
    ds = model.synthetic(512, 12, 400, seed=4)
    net = ds.network.pack()
    out = str(tmp_path / "m")
    prepared.prepare(ds.network, out, 3)
    from fsd_runtime import budget

    indptr, indices, _ = ds.images.arrays
    fps = prepared.footprints(prepared.open_model(out), indptr, indices)
    one, whole = (max(budget.peak_bytes(fp, b) for fp in fps) for b in (1, None))
    result = run_distributed(None, ds.images.arrays, prepared=out, launcher={"kind": "thread"},
                             worker_memory_mb=(one + whole) / 2 / 2**20)
    assert max(m["batches"] for m in result.worker_metrics) > 1
    assert_same(result.activations, fsd_kernels.infer(*ds.images.arrays, net))


def test_a_model_without_worker_sizes_runs_unbatched(tmp_path):
    """A model.json without the workers' sizes (re-sealed without them: what models prepared
    before they were recorded lacked) still runs (no footprint: one batch, the local memory
    budget for the model's worker count)."""
    ds = model.synthetic(256, 6, 40, seed=8)
    out = tmp_path / "m"
    prepared.prepare(ds.network, str(out), 3)
    reseal(out, lambda meta: meta.pop("worker_sizes"))
    for launcher in ("thread", "fork"):
        result = run_distributed(None, ds.images.arrays, prepared=str(out), launcher={"kind": launcher})
        assert_same(result.activations, fsd_kernels.infer(*ds.images.arrays, ds.network.pack()))
        assert max(m["batches"] for m in result.worker_metrics) == 1


# --- a worker reads its segments as its run needs them ---

def _parked_then_revived(n: int = 37, n_layers: int = 9, revive: int = 6, seed: int = 5):
    """Layer 0 saturates every image; layers 1..revive-1 keep saturation (positive weights), so
    every image is parked and those layers are idle; layer ``revive`` has weights of both signs
    (parked images come back), the layers after it too. Biases per neuron, of both signs."""
    rng = np.random.default_rng(seed)
    layers, biases = [], []
    for l in range(n_layers):
        w = sp.random(n, n, density=0.25, random_state=rng, format="csr", dtype=np.float32)
        w.data[:] = 2.0 if l < revive else rng.uniform(-1.5, 1.5, w.nnz).astype(np.float32)
        w = (w + sp.eye(n, dtype=np.float32, format="csr") * (2.0 if l < revive else 0.5)).tocsr()
        layers.append(w)
        biases.append(rng.uniform(0.0, 0.3, n).astype(np.float32) if l < revive
                      else rng.uniform(-0.4, 0.4, n).astype(np.float32))
    dense = rng.uniform(0.5, 4.0, (23, n)).astype(np.float32) * (rng.random((23, n)) < 0.6)
    dense[3] = 0.0  # an empty image
    return dense, layers, biases, np.float32(8.0)


@pytest.mark.parametrize("park", [True, False])
def test_a_segmented_share_is_read_as_needed_and_runs_exact(tmp_path, park):
    case = _parked_then_revived()
    dense, layers, biases, ymax = case
    net = network_of(case)
    assert list(net.pack().keeps_saturated[:6]) == [True] * 6 and not net.pack().keeps_saturated[6]
    want = expected(case)
    out = str(tmp_path / "m")
    meta = prepared.prepare(net, out, 3, segment_bytes=1)  # a segment a layer
    assert [c for _, c in meta["segments"]] == [1] * 9
    result = run_distributed(None, images_csr(dense), prepared=out, launcher={"kind": "thread"},
                             park_saturated=park)
    assert_bit_identical(result.activations, want, f"park={park}")
    for w, m in enumerate(result.worker_metrics):
        reads = m["model_reads"]
        files = [os.path.getsize(os.path.join(out, prepared.segment_key(w, s))) for s in reads["segments"]]
        assert reads["bytes"] == sum(files) and reads["gets"] == 2 + len(reads["segments"])
        assert len(set(reads["segments"])) == len(reads["segments"]), "no segment read twice"
        busy = {r["layer"] for r in result.metrics if r["worker"] == w and r["images_active"]}
        if park:  # read: the first segment, the layers computed and their next sends, the last
            assert set(reads["segments"]) == {0, 8} | busy | {l + 1 for l in busy if l < 8}, (reads, busy)
            assert not set(reads["segments"]) & {4, 5}, reads  # every image parked: idle, never read
        else:
            assert sorted(reads["segments"]) == list(range(9))
    assert result.traffic["model_gets_per_worker"] == [m["model_reads"]["gets"] for m in result.worker_metrics]


def test_a_segment_reader_holds_two_segments_and_checks_each_as_read(tmp_path):
    case = _parked_then_revived(n=41, n_layers=12, revive=0, seed=8)  # weights of both signs throughout
    out = str(tmp_path / "m")
    prepared.prepare(network_of(case), out, 4, segment_bytes=1)
    found = prepared.open_model(out)
    in0 = prepared.layer0_inputs(found)
    images = images_csr(case[0])
    active, saturated = plan.initial_status(images[0], images[2], 41, np.float32(8.0))
    whole = prepared.load_worker_share(found, prepared.inputs_share(found, 2, in0[2], images, active, saturated), 2)
    lazy = prepared.open_worker_share(found, prepared.inputs_share(found, 2, in0[2], images, active, saturated), 2)
    reader = lazy.reader
    assert reader.segments_read == [0] and reader.footprint is not None
    for l in range(12):  # the loop's order: layer l, then l + 1's send plan
        for name in prepared.SegmentReader.PER_LAYER:
            got, ref = getattr(lazy, name)[l], getattr(whole, name)[l]
            assert (all(np.array_equal(a, b) for a, b in zip(got, ref)) if isinstance(ref, list)
                    else np.array_equal(got, ref))
        if l + 1 < 12:
            lazy.send_pos[l + 1]
        assert len(reader.held) <= 2
    assert reader.segments_read == list(range(12))
    assert lazy.to_bytes() == whole.to_bytes()  # read whole again, in order: the same share
    # a segment whose indices leave its ranges is refused when read, naming it (re-sealed after
    # the edit: the digests would refuse it before any parsing)
    key = os.path.join(out, prepared.segment_key(2, 7))
    z = dict(np.load(key))
    z["rowidx"] = z["rowidx"].copy()
    z["rowidx"][-1] = 10**6
    with open(key, "wb") as f:
        np.savez(f, **z)
    reseal(out)
    found = prepared.open_model(out)
    lazy = prepared.open_worker_share(found, prepared.inputs_share(found, 2, in0[2], images, active, saturated), 2)
    lazy.colptr[6]
    with pytest.raises(prepared.StorageError, match="layer 7 rowidx has indices outside"):
        lazy.colptr[7]
    # a layer read after idle layers: its positions in the layer before are checked on first use
    lazy = prepared.open_worker_share(found, prepared.inputs_share(found, 2, in0[2], images, active, saturated), 2)
    lazy.colptr[9]
    assert 9 in lazy.reader.unlinked
    with pytest.raises(prepared.StorageError, match="layer 9's plan used before layer 8"):
        lazy.local_pos[9]
    lazy.colptr[8]
    assert 9 in lazy.reader.unlinked  # read before 9: still unchecked until 9's positions are used
    lazy.send_pos[9]
    assert 9 not in lazy.reader.unlinked
