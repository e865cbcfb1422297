"""``fsd-inference run`` on one machine: JSON keys, human output, progress, data options, errors."""
import gzip
import io
import json
import os
import warnings

import numpy as np
import pytest

from fsd_runtime import cli, model


def run(capsys, *argv):
    code = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_reports_the_golden_run(capsys, official):
    code, out, err = run(capsys, "--json", "--images", "2000")
    result = json.loads(out)
    assert code == 0
    assert {"images", "layers", "neurons", "categories", "golden_match", "wall_seconds",
            "edges_per_second"} <= result.keys()
    assert (result["images"], result["layers"], result["neurons"]) == (2000, 120, 1024)
    gold = official.categories[official.categories < 2000] + 1
    assert result["categories"] == gold.tolist() and result["golden_match"] is True
    assert result["wall_seconds"] > 0
    assert result["edges_per_second"] == pytest.approx(2000 * 120 * 32768 / result["wall_seconds"])
    assert err == "", "no progress on a non-terminal with --json"


def test_human_output_and_progress_lines(capsys):
    code, out, err = run(capsys, "--images", "300", "--threads", "1")
    assert code == 0
    assert "golden match: yes" in out and "nominal rate" in out and "wall time" in out
    assert "[fsd-inference] inferring 300 images" in err
    assert "\r" not in err, "no redrawn progress line when stderr is not a terminal"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_redrawn_on_a_terminal(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli.main(["run", "--json", "--images", "600", "--batch-size", "200", "--threads", "1"]) == 0
    shown = terminal.getvalue()
    for done in (200, 400, 600):
        assert f"\r[fsd-inference] {done}/600 images" in shown
    assert shown.endswith("(100%)\n")
    json.loads(capsys.readouterr().out)


def test_synthetic_run_has_no_golden_file(capsys):
    code, out, _ = run(capsys, "--json", "--synthetic", "1024x30", "--images", "300")
    result = json.loads(out)
    assert code == 0 and result["golden_match"] is None
    assert (result["images"], result["layers"], result["neurons"]) == (300, 30, 1024)
    assert result["categories"] == sorted(result["categories"]) and result["categories"]


def test_official_files_from_disk(capsys, tmp_path, official):
    net_dir = tmp_path / "net"
    net_dir.mkdir()
    for k, w in enumerate(official.network.layers[:2], 1):
        rows = np.repeat(np.arange(1024), np.diff(w.indptr)) + 1
        np.savetxt(net_dir / f"n1024-l{k}.tsv", np.c_[rows, w.indices + 1, w.data], fmt="%d\t%d\t%g")
    images = official.images.rows(0, 100)
    rows = np.repeat(np.arange(100), np.diff(images.indptr)) + 1
    np.savetxt(tmp_path / "images.tsv", np.c_[rows, images.indices + 1, images.data], fmt="%d\t%d\t%g")
    (tmp_path / "cats.tsv").write_text("1\n")
    code, out, _ = run(capsys, "--json", "--weights", str(net_dir), "--inputs", str(tmp_path / "images.tsv"),
                       "--categories", str(tmp_path / "cats.tsv"))
    result = json.loads(out)
    assert (result["layers"], result["images"]) == (2, 100)
    assert result["golden_match"] is False and code == 1, "two layers leave other survivors than 120"


def test_bad_data_file_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "n1024-l1.tsv").write_text("1\t1\t0.0625\n1\toops\t0.0625\n")
    (tmp_path / "images.tsv").write_text("1\t1\t1\n")
    code, out, err = run(capsys, "--weights", str(tmp_path), "--inputs", str(tmp_path / "images.tsv"))
    assert code == 2 and out == ""
    assert "n1024-l1.tsv, line 2, field 2: expected a number, got 'oops'" in err


def test_option_errors(capsys):
    code, _, err = run(capsys, "--weights", "somewhere")
    assert code == 2 and "--weights and --inputs go together" in err
    code, _, err = run(capsys, "--synthetic", "big")
    assert code == 2 and "--synthetic expects NxL" in err
    code, _, err = run(capsys, "--synthetic", "1000x2", "--images", "5")
    assert code == 2 and "multiple of 16" in err


def _damage(tmp_path, case: str) -> tuple[list[str], str]:
    """A network directory and inputs with one thing wrong: (run's data options, what the error names)."""
    net, inputs = tmp_path / "net", tmp_path / "inputs.tsv"
    net.mkdir()
    for k in (1, 2):
        (net / f"n4-l{k}.tsv").write_text("1\t2\t0.5\n3\t4\t-1\n")
    inputs.write_text("1\t1\t1\n2\t3\t1\n")
    argv = ["--weights", str(net), "--inputs", str(inputs), "--bias", "0"]
    if case == "input beyond float32":
        inputs.write_text("1\t1\t1\n2\t3\t1e39\n")
        return argv, f"{inputs}, line 2, field 3: expected a finite value float32 can hold"
    if case == "weight beyond float32":
        (net / "n4-l2.tsv").write_text("1\t2\t-1e39\n")
        return argv, f"{net / 'n4-l2.tsv'}, line 1, field 3: expected a finite value float32 can hold"
    if case == "bias beyond float32":
        (net / "n4-bias.tsv").write_text("1\t1\t0\n2\t4\t1e39\n")
        return argv[:4], f"{net / 'n4-bias.tsv'}, line 2, field 3: expected a finite value float32 can hold"
    if case == "huge category id":
        (tmp_path / "cats.tsv").write_text("99999999999999999999999\n")
        return argv + ["--categories", str(tmp_path / "cats.tsv")], f"{tmp_path / 'cats.tsv'}, line 1: image id"
    if case == "corrupt gzip":
        raw = bytearray(gzip.compress("".join(f"{i}\t{i % 4 + 1}\t1\n" for i in range(1, 200)).encode()))
        for i in range(20, 40):
            raw[i] ^= 0x55
        (tmp_path / "inputs.tsv.gz").write_bytes(bytes(raw))
        return argv[:2] + ["--inputs", str(tmp_path / "inputs.tsv.gz"), "--bias", "0"], \
            f"{tmp_path / 'inputs.tsv.gz'}: cannot be read"
    if case == "two files for a layer":
        (net / "n4-l01.tsv").write_text("1\t1\t1\n")
        return argv, f"{net}: several layer 1 files ['n4-l01.tsv', 'n4-l1.tsv']"
    if case == "inputs a directory":
        return argv[:2] + ["--inputs", str(tmp_path), "--bias", "0"], f"--inputs {tmp_path} is a directory"
    if case == "categories a directory":
        return argv + ["--categories", str(net)], f"--categories {net} is a directory"
    if case == "encrypted npz":
        path = tmp_path / "net.npz"
        model.save_network(model.load_network(str(net), 0.0), str(path))
        raw = bytearray(path.read_bytes())
        for magic, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the encrypted flag of every member
            i = raw.find(magic)
            while i >= 0:
                raw[i + at] |= 1
                i = raw.find(magic, i + 4)
        path.write_bytes(bytes(raw))
        return ["--weights", str(path), "--inputs", str(inputs)], f"{path}: field 'version' cannot be read"
    raise KeyError(case)


CASES = ["input beyond float32", "weight beyond float32", "bias beyond float32", "huge category id",
         "corrupt gzip", "two files for a layer", "encrypted npz", "inputs a directory", "categories a directory"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_data_is_exit_2_naming_the_file(capsys, tmp_path, case):
    argv, names = _damage(tmp_path, case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast" on the way
        code, out, err = run(capsys, *argv)
    assert code == 2 and out == "", (code, err)
    assert f"fsd-inference: error: {names}" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["weight beyond float32", "two files for a layer", "encrypted npz"])
def test_prepare_refuses_damaged_networks_with_exit_2(capsys, tmp_path, case):
    argv, names = _damage(tmp_path, case)
    weights = argv[argv.index("--weights") + 1]
    bias = ["--bias", "0"] if os.path.isdir(weights) else []
    code = cli.main(["prepare", "--weights", weights, *bias, "--workers", "2", "--out", str(tmp_path / "model")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, err)
    assert f"fsd-inference: error: {names}" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "model") or not os.listdir(tmp_path / "model")


def test_a_width_beyond_the_memory_available_is_exit_2(capsys, tmp_path, monkeypatch):
    from fsd_runtime import budget

    (tmp_path / "n100000000-l1.tsv").write_text("1\t1\t1\n")  # one line, N from the name
    (tmp_path / "inputs.tsv").write_text("1\t1\t1\n")
    monkeypatch.setattr(budget, "available_bytes", lambda: 2**30)
    code, out, err = run(capsys, "--weights", str(tmp_path), "--inputs", str(tmp_path / "inputs.tsv"), "--bias", "0")
    assert code == 2 and out == ""
    assert (f"{tmp_path / 'n100000000-l1.tsv'}: N=100000000 (from the file name) needs 1.9 GiB for the per-neuron "
            "arrays alone") in err and "more than the 1.0 GiB of memory available now" in err
