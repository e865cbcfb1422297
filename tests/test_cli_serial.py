"""``fsd-inference run`` on one machine: JSON keys, human output, progress, data options, errors."""
import io
import json

import numpy as np
import pytest

from fsd_runtime import cli


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
