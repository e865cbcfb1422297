"""bench/paper.py's own logic: the streamed serial reference of its beyond-the-paper rows, and the
re-pricing of kept runs (the numbers in README come from these)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import fsd_kernels
from fsd_runtime import model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import paper  # noqa: E402


@pytest.mark.parametrize("chunk", [1, 7, 40, 500])
def test_the_streamed_reference_is_the_whole_network_run(chunk):
    ds = model.synthetic(1024, 45, 300, seed=0)
    want = fsd_kernels.infer(*ds.images.arrays, ds.network.pack())
    got = paper.streamed_reference(model.stream_synthetic(1024, 45, 0), ds.images.arrays, chunk=chunk)
    assert want.categories.size > 0
    assert np.array_equal(want.indptr, got.indptr) and np.array_equal(want.indices, got.indices)
    assert np.array_equal(want.data.view(np.uint32), got.data.view(np.uint32))


def test_kept_runs_reprice_to_the_rows_first_printed(tmp_path, capsys, monkeypatch, native_so):
    monkeypatch.setenv("FSD_KERNELS_NATIVE", native_so)  # the default --kernels native, built once
    keep = tmp_path / "runs"
    assert paper.main(["--sizes", "1024", "--workers", "3", "--images", "300", "--json",
                       "--save-runs", str(keep)]) == 0
    first = {r["channel"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(first) == {"queue", "object"} and all(r["exact"] for r in first.values())
    assert paper.main(["--reprice", str(keep)]) == 0
    again = {r["channel"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for channel, row in first.items():
        for key in ("bytes", "requests", "requests_optimistic", "usd", "usd_optimistic", "usd_at_paper_memory",
                    "lambda_mb_modelled", "request_counts"):
            assert again[channel][key] == row[key], (channel, key)
        # Lambda memory fits the measured worker (native kernels, as on Lambda) and the AWS
        # clients a Lambda worker adds, with a quarter to spare, at most the paper's
        assert row["kernels"] == "native" and 5 < row["aws_clients_mb"] < 200
        assert (row["worker_peak_rss_mb"] + row["aws_clients_mb"]) * 1.25 <= row["lambda_mb_modelled"] <= 1000
    assert os.environ["FSD_KERNELS_NATIVE"] == native_so  # main() leaves the environment as it was
    # a worker too big for any Lambda size is still reported, priced at the paper's size, said so
    name = sorted(os.listdir(keep))[0]
    saved = json.loads((keep / name).read_text())
    saved["row"]["worker_peak_rss_mb"] = 9000.0
    (keep / name).write_text(json.dumps(saved))
    assert paper.main(["--reprice", str(keep)]) == 0
    big = json.loads(capsys.readouterr().out)["rows"][0]
    assert big["lambda_mb_modelled"] == 1000 and "10240" in big["lambda_fit_note"]


def test_without_parking_rows_run_every_round_with_the_same_bits(capsys, monkeypatch, native_so):
    args = ["--sizes", "1024", "--workers", "3", "--images", "300", "--channels", "queue", "--json"]
    monkeypatch.setenv("FSD_KERNELS_NATIVE", native_so)
    assert paper.main(args) == 0
    parked = json.loads(capsys.readouterr().out)["rows"][0]
    assert paper.main(args + ["--no-parking", "--kernels", "jit"]) == 0
    out = json.loads(capsys.readouterr().out)
    unparked = out["rows"][0]
    assert unparked["exact"] and not unparked["parking"] and parked["parking"] and not out["parking"]
    # the JIT's workers hold numba (~140 MB) that Lambda's native worker path never loads
    assert parked["kernels"] == "native" and unparked["kernels"] == "jit" == out["kernels"]
    assert parked["worker_peak_rss_mb"] + 60 < unparked["worker_peak_rss_mb"]
    assert parked["rounds"] < unparked["rounds"] == 119
    assert unparked["messages"] > parked["messages"]
