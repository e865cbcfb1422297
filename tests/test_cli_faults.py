"""The CLI under misuse and faults, as a user meets it: a real coordinator (``python -m
fsd_runtime.cli``) and real worker processes, each run in its own $TMPDIR.

Signals end a run with one line and 128 + signal after everything of the run is gone; workers
of a SIGKILLed coordinator exit on their own; a dead worker is reported by name within seconds
at the default timeouts; --help and usage errors load nothing heavy; every option is checked
before any work."""
from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

from fsd_runtime import cli, events, liveness

from proc_helpers import processes_with_marker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEACON = struct.Struct("<qq")


def _env(tmp: str, marker: str) -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TMPDIR": tmp, "FSD_TEST_MARKER": marker}


_marked = processes_with_marker


def _beacons(tmp: str, skip=()) -> dict[int, tuple[int, int]]:
    """worker -> (pid, layer) from the beacons of the run records in ``tmp`` (but ``skip``)."""
    out = {}
    for path in glob.glob(os.path.join(tmp, "fsd-run-*", "workers", "*")):
        if path.split(os.sep)[-3] in skip:
            continue
        name = os.path.basename(path)
        if name.isdigit():
            try:
                with open(path, "rb") as f:
                    out[int(name)] = BEACON.unpack(f.read(BEACON.size))
            except (OSError, struct.error):
                pass
    return out


def _until(condition, seconds: float, step: float = 0.005):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()


class Run:
    """``fsd-inference run ARGS`` in a subprocess (own session, own $TMPDIR, a marker)."""

    def __init__(self, tmp_path, *args):
        self.tmp = str(tmp_path)
        self.marker = uuid.uuid4().hex
        self.before = set(os.listdir(self.tmp))  # records of earlier runs are not this run's
        self.proc = subprocess.Popen([sys.executable, "-m", "fsd_runtime.cli", "run", *args],
                                     env=_env(self.tmp, self.marker), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def workers_started(self, n: int, timeout: float = 120) -> dict:
        got = _until(lambda: (lambda b: b if len(b) >= n else None)(_beacons(self.tmp, self.before)), timeout)
        assert got, f"{n} workers did not start: {self.finish(5)}"
        return got

    def finish(self, timeout: float = 120):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def leftovers(self) -> list[str]:
        return sorted(n for n in os.listdir(self.tmp) if n.startswith("fsd-"))

    def kill_all(self) -> None:
        for pid in _marked(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def runs():
    started = []

    def start(tmp_path, *args):
        run = Run(tmp_path, *args)
        started.append(run)
        return run
    yield start
    for run in started:
        run.kill_all()


# --- signals ---

@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_signal_ends_the_run_with_one_line_and_removes_everything(runs, tmp_path, signum, code, word):
    run = runs(tmp_path, "--workers", "3", "--images", "500")
    workers = run.workers_started(3)
    os.kill(workers[2][0], signal.SIGSTOP)  # the run cannot finish before the signal lands
    os.kill(run.proc.pid, signum)
    rc, out, err = run.finish(60)
    assert rc == code, err
    lines = [line for line in err.splitlines() if not line.startswith("[fsd-inference]")]
    assert len(lines) == 1 and f"{word} ({signal.Signals(signum).name})" in lines[0], err
    assert "Traceback" not in err and out == ""
    assert _until(lambda: not _marked(run.marker), 10), "workers outlived the run"
    assert run.leftovers() == []


def test_workers_of_a_killed_coordinator_exit_and_nothing_stays(runs, tmp_path):
    run = runs(tmp_path, "--workers", "3", "--images", "500")
    workers = run.workers_started(3)
    stopped = workers[2][0]
    os.kill(stopped, signal.SIGSTOP)  # a worker that cannot notice anything for now
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(30)  # (its pipes stay open while a worker lives: no communicate here)
    others = {workers[0][0], workers[1][0]}
    assert _until(lambda: not others & set(_marked(run.marker)), 10), "workers outlived their coordinator"
    os.kill(stopped, signal.SIGCONT)  # wakes up, finds its coordinator gone
    assert _until(lambda: not _marked(run.marker), 10), "a resumed worker outlived its coordinator"
    assert _until(lambda: run.leftovers() == [], 5), run.leftovers()


def _power_cut(run: Run) -> str:
    """Kill a run's coordinator and workers so that none of them cleans up; its record's name."""
    workers = run.workers_started(2)
    for pid, _ in workers.values():
        os.kill(pid, signal.SIGSTOP)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(30)
    for pid, _ in workers.values():
        os.kill(pid, signal.SIGKILL)
    assert _until(lambda: not _marked(run.marker), 10)
    (record,) = [n for n in run.leftovers() if n.startswith("fsd-run-")]
    return record


def test_leftovers_of_a_dead_run_are_removed_by_the_next_run_and_clean_spares_live_ones(runs, tmp_path):
    dead = _power_cut(runs(tmp_path, "--workers", "2", "--images", "200"))
    run = runs(tmp_path, "--workers", "2", "--images", "200")
    run.workers_started(2)
    assert dead not in run.leftovers()  # swept when the next run started
    env = _env(run.tmp, run.marker)
    done = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "clean"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "nothing to clean\n", done  # the live run is spared
    rc, out, err = run.finish(120)
    assert rc == 0 and "golden match: yes" in out, err
    assert run.leftovers() == []


def test_clean_removes_what_a_dead_run_left(runs, tmp_path):
    run = runs(tmp_path, "--workers", "2", "--images", "200")
    dead = _power_cut(run)
    done = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "clean"], env=_env(run.tmp, run.marker),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "removed leftovers of dead run" in done.stdout and dead in done.stdout, done
    assert run.leftovers() == []


# --- dead workers ---

def test_a_dead_worker_is_reported_by_name_within_seconds(runs, tmp_path):
    """Default timeouts (receive 60 s): the death is found by liveness, not by a timeout."""
    run = runs(tmp_path, "--workers", "3", "--images", "500")
    workers = run.workers_started(3)
    os.kill(workers[1][0], signal.SIGKILL)
    killed = time.monotonic()
    rc, out, err = run.finish(60)
    took = time.monotonic() - killed
    assert rc == 3 and out == "", err
    assert "worker 1: died" in err and "Traceback" not in err
    assert took < 15, f"reported {took:.1f} s after the death"
    assert _until(lambda: not _marked(run.marker), 10)
    assert run.leftovers() == []


# --- start and usage ---

def test_help_and_usage_errors_load_nothing_heavy():
    probe = ("import sys\nfrom fsd_runtime import cli\n"
             "for argv in (['--help'], ['run', '--help'], ['run', '--images', '0'], ['run', '--bias', '1']):\n"
             "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'numba', 'boto3', 'botocore', 'scipy'}))")
    done = subprocess.run([sys.executable, "-c", probe], env=_env(os.environ.get("TMPDIR", "/tmp"), "x"),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "[]", done
    assert "exit status:" in done.stdout and "130" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--images", "0"], "--images: must be at least 1"),
    (["--images", "-5"], "--images: must be at least 1"),
    (["--workers", "0"], "--workers: must be at least 1"),
    (["--workers", str(cli.MAX_WORKERS + 1)], f"at most {cli.MAX_WORKERS} workers"),
    (["--batch-size", "-1"], "--batch-size: must be at least 1"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--workers", "2", "--receive-timeout", "0"], "--receive-timeout: must be more than 0"),
    (["--workers", "2", "--run-timeout", "nan"], "--run-timeout: must be more than 0"),
    (["--workers", "2", "--fanout", "0"], "--fanout: must be at least 1"),
    (["--workers", "2", "--fanout", str(events.MAX_FANOUT + 1)], f"--fanout: at most {events.MAX_FANOUT}"),
    (["--batch-size", str(events.MAX_BATCH_SIZE + 1)], f"--batch-size: at most {events.MAX_BATCH_SIZE}"),
    (["--synthetic", "1024x2", "--seed", "-1"], "--seed: must be at least 0"),
    (["--weights", "w", "--inputs", "i", "--bias", "1e39"], "--bias: expected a finite number float32 can hold"),
    (["--synthetic", "foo"], "--synthetic expects NxL"),
    (["--synthetic", "0x3"], "positive N and L"),
    (["--synthetic", "272x3"], "--synthetic 272x3: N=272 does not fit the generator"),  # 16 | 272, its grid is 32 wide
    (["--weights", "w"], "--weights and --inputs go together"),
    (["--categories", "junk.tsv"], "--categories applies to --weights/--inputs only"),
    (["--bias", "-0.3"], "--bias applies to --weights/--inputs only"),
    (["--seed", "3"], "--seed applies to --synthetic only"),
    (["--synthetic", "1024x2", "--weights", "w", "--inputs", "i"], "does not apply to --synthetic"),
    (["--channel", "object"], "--channel applies to distributed runs only: add --workers P"),
    (["--metrics-dir", "m"], "--metrics-dir applies to distributed runs only"),
    (["--partition", "contiguous"], "--partition applies to distributed runs only"),
    (["--workers", "2", "--invoker", "local"], "--invoker applies to --channel queue|object only"),
    (["--workers", "40", "--fanout", "1"], "chain deeper than"),
    (["--weights", "/nonexistent/w", "--inputs", "/nonexistent/i"], "no such file or directory"),
    (["--images", "20000"], "--images 20000: the data has only 10000 images"),
    (["--synthetic", "32x2", "--workers", "64"], "the net has only 32 neurons"),
    (["--synthetic", "1024x2", "--images", "2000000000"], "more than this machine's"),  # never allocated
    (["--synthetic", "65536x100000"], "more than this machine's"),
])
def test_options_are_checked_before_any_work(capsys, argv, message):
    try:
        code = cli.main(["run", *argv])
    except SystemExit as exc:  # argparse's own refusals exit 2 too
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert message in err and "Traceback" not in err
    assert "[fsd-inference]" not in err, "refused after work started"


@pytest.mark.parametrize("argv, message", [
    (["cleanup", "--older-than", "nan"], "--older-than: expected finite seconds >= 0, got 'nan'"),
    (["cleanup", "--older-than", "-1"], "--older-than: expected finite seconds >= 0, got '-1'"),
    (["prepare", "--synthetic", "64x2", "--seed", "-1", "--workers", "2", "--out", "m"], "--seed: must be at least 0"),
    (["prepare", "--weights", "w", "--bias=-1e39", "--workers", "2", "--out", "m"], "--bias: expected a finite number"),
])
def test_other_commands_check_their_options_first(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and message in err and "Traceback" not in err


def test_prepare_takes_any_synthetic_size_the_net_generator_takes(capsys, tmp_path):
    """``prepare`` makes no images, so only the net's rule applies: 272 (a multiple of 16 whose
    image grid would be 32 wide) prepares, 40 is refused naming the sizes that work."""
    code = cli.main(["prepare", "--synthetic", "40x2", "--workers", "2", "--out", str(tmp_path / "a")])
    _, err = capsys.readouterr()
    assert code == 2 and "--synthetic 40x2: N=40 does not fit the generator" in err and "nearest: 32 or 48" in err
    assert "image grid" not in err and not (tmp_path / "a").exists()
    code = cli.main(["prepare", "--synthetic", "272x2", "--workers", "2", "--out", str(tmp_path / "b"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["n_neurons"] == 272, err


def test_cleanup_refuses_a_non_finite_age():
    pytest.importorskip("botocore")
    from fsd_runtime.aws import deploy, run as awsrun

    options = awsrun.CommandOptions("cleanup", deploy.DeploySettings(name="fsd-test"), older_than_s=float("nan"))
    with pytest.raises(ValueError, match=r"--older-than must be finite seconds >= 0, not nan"):
        awsrun.run_command(options)


def test_bad_metrics_dir_is_refused_before_the_run(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = cli.main(["run", "--workers", "2", "--metrics-dir", str(blocker / "sub")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "--metrics-dir" in err and "cannot write there" in err
    assert "packing" not in err


@pytest.fixture
def thread_workers(monkeypatch):
    """CLI runs with worker threads (same worker loop and local channel, no process start-up)."""
    monkeypatch.setattr(cli, "launcher_config", lambda args: {"kind": "thread"})


def test_metrics_that_cannot_be_written_keep_the_printed_result(capsys, tmp_path, monkeypatch, thread_workers):
    from fsd_runtime import metrics

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(metrics, "write", fail)
    code = cli.main(["run", "--workers", "2", "--images", "300", "--json", "--metrics-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 3 and result["golden_match"] is True
    assert "cannot write metrics" in err and "No space left" in err and "result above stands" in err


def test_metrics_png_is_written_or_its_absence_said(capsys, tmp_path, thread_workers):
    code = cli.main(["run", "--workers", "2", "--images", "200", "--metrics-dir", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert code == 0
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "metrics.png").exists() and "and PNG" in out
    except ImportError:
        assert not (tmp_path / "metrics.png").exists() and "no PNG: matplotlib is not installed" in out


def test_bad_input_files_are_data_errors_naming_file_and_line(capsys, tmp_path, official):
    import numpy as np

    net_dir = tmp_path / "net"
    net_dir.mkdir()
    w = official.network.layers[0]
    rows = np.repeat(np.arange(1024), np.diff(w.indptr)) + 1
    np.savetxt(net_dir / "n1024-l1.tsv", np.c_[rows, w.indices + 1, w.data], fmt="%d\t%d\t%g")
    cases = {"empty.tsv": ("", "empty.tsv: the file has no entries, so no images"),
             "huge.tsv": ("1\t1\t1\n3000000000\t2\t1\n", "huge.tsv, line 2, field 1"),
             "far.tsv": ("1\t1\t1\n20000000\t2\t1\n", "far.tsv, line 2, field 1"),
             "inf.tsv": ("1\t1\t1\n1e30\t2\t1\n", "inf.tsv, line 2, field 1")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        code = cli.main(["run", "--weights", str(net_dir), "--inputs", str(tmp_path / name)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and message in err, (name, err)
    (tmp_path / "ok.tsv").write_text("1\t1\t1\n")
    (net_dir / "n1024-l2.tsv").write_text("")  # an all-zero layer (docs/formats.md): nothing passes it
    code = cli.main(["run", "--weights", str(net_dir), "--inputs", str(tmp_path / "ok.tsv")])
    out, err = capsys.readouterr()
    assert code == 0 and "categories     0 found" in out and "2 layers, 1 images" in out, (out, err)


def test_long_tmpdir_runs_distributed(tmp_path, monkeypatch, capsys, thread_workers):
    import tempfile

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))  # what TMPDIR=deep gives a fresh process
    assert len(str(deep)) > 108, "not long enough to break a socket path"
    code = cli.main(["run", "--workers", "2", "--images", "200"])
    out, err = capsys.readouterr()
    assert code == 0 and "golden match: yes" in out, err
    assert os.listdir(deep) == []


def test_a_worker_dying_mid_run_is_reported_with_its_layer(runs, tmp_path):
    run = runs(tmp_path, "--workers", "3", "--images", "500")
    workers = run.workers_started(3)
    # worker 0 listens, then stops: workers 1 and 2 compute layer 0 and wait in layer 1 for it
    assert _until(lambda: glob.glob(os.path.join(run.tmp, "fsd-*", "0.sock")), 120, step=0.001)
    os.kill(workers[0][0], signal.SIGSTOP)
    assert _until(lambda: _beacons(run.tmp).get(2, (0, -1))[1] >= 1, 120), "worker 2 never reached layer 1"
    layer = _beacons(run.tmp)[2][1]
    os.kill(workers[2][0], signal.SIGKILL)
    rc, out, err = run.finish(60)
    assert rc == 3 and layer == 1, err
    failed = err.split("distributed run failed:")[1].strip("\n").splitlines()
    assert failed and all(line.startswith("  worker ") for line in failed), err  # one line a worker
    assert failed[0].startswith("  worker 2: died at layer 1:"), err  # the cause comes first
    assert _until(lambda: not _marked(run.marker), 10)
    assert run.leftovers() == []


def test_a_dead_forked_worker_with_children_is_reported_within_seconds(runs, tmp_path):
    """Fork launcher (the CLI's): worker 1 forks workers 3 and 4 after taking its beacon's lock.
    Its children must not hold that lock, or its death goes unseen until a receive timeout."""
    run = runs(tmp_path, "--workers", "7", "--images", "500", "--receive-timeout", "40")
    workers = run.workers_started(7)
    os.kill(workers[2][0], signal.SIGSTOP)  # the run cannot finish before the death
    os.kill(workers[1][0], signal.SIGKILL)
    killed = time.monotonic()
    rc, out, err = run.finish(60)
    took = time.monotonic() - killed
    assert rc == 3 and "worker 1: died" in err and "Traceback" not in err, err
    assert took < 15, f"reported {took:.1f} s after the death"
    assert _until(lambda: not _marked(run.marker), 10)
    assert run.leftovers() == []


# --- first run: the kernels never compile silently ---

def test_kernel_cache_is_looked_for_where_numba_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FSD_KERNELS_BACKEND", raising=False)
    native = glob.glob(os.path.join(ROOT, "fsd_kernels", "_native*"))
    assert cli._kernel_cache_found() is bool(native)  # an empty numba cache: JIT must compile
    for module in ("_core", "_codec_core"):
        (tmp_path / "fsd_kernels").mkdir(exist_ok=True)
        (tmp_path / "fsd_kernels" / f"{module}.infer-1.py311.nbi").write_bytes(b"")
    assert cli._kernel_cache_found() is True


def test_compiling_is_announced_once_with_its_duration():
    probe = ("from fsd_runtime import cli\ncli._kernel_cache_found = lambda: False\n"
             "cli.load_kernels()\ncli.load_kernels()\n")
    done = subprocess.run([sys.executable, "-c", probe], env=_env(os.environ.get("TMPDIR", "/tmp"), "x"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "compiling the kernels for this machine (first run only" in lines[0], lines
    assert lines[1].startswith("[fsd-inference] kernels compiled in ") and " s (" in lines[1], lines


@pytest.mark.skipif(not os.environ.get("FSD_SLOW_TESTS"), reason="compiles the kernels (1-3 min): FSD_SLOW_TESTS=1")
def test_a_first_run_says_it_compiles_and_the_second_does_not(tmp_path):
    env = {**_env(os.environ.get("TMPDIR", "/tmp"), "x"), "NUMBA_CACHE_DIR": str(tmp_path),
           "FSD_KERNELS_BACKEND": "jit"}
    argv = [sys.executable, "-m", "fsd_runtime.cli", "run", "--images", "100"]
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0 and first.stderr.count("compiling the kernels") == 1, first.stderr
    assert "kernels compiled in" in first.stderr
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0 and "compiling" not in second.stderr and "compiled" not in second.stderr


# --- AWS channels: nothing of an interrupted run stays (local AWS-API server) ---

def _aws_leftovers(name: str, settings) -> dict:
    from fsd_runtime.aws import clients as aws, deploy

    names = deploy.names_for(deploy.DeploySettings(name=name), settings)
    objects = aws.client("s3", settings).list_objects_v2(Bucket=names.bucket).get("Contents", [])
    queues = aws.client("sqs", settings).list_queues(QueueNamePrefix=f"{name}_").get("QueueUrls", [])
    subscriptions = [s for s in aws.client("sns", settings).list_subscriptions()["Subscriptions"]
                     if f":{name}_" in s["TopicArn"]]
    return {"objects": [o["Key"] for o in objects], "queues": queues, "subscriptions": subscriptions}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_queue_run_ended_by_a_signal_leaves_no_queue_subscription_or_object(aws_server, runs, tmp_path,
                                                                               signum):
    from fsd_runtime.aws import deploy
    from fsd_runtime.aws.clients import AwsSettings

    settings = AwsSettings(region="us-east-1", endpoint_url=aws_server.endpoint_url)
    name = f"fsd-sig-{uuid.uuid4().hex[:6]}"
    deploy.deploy(deploy.DeploySettings(name=name, topics=1, lambda_function=False), settings)
    try:
        run = runs(tmp_path, "--workers", "2", "--images", "200", "--channel", "queue", "--invoker", "local",
                   "--deployment", name, "--endpoint-url", aws_server.endpoint_url, "--region", "us-east-1")
        workers = run.workers_started(2)
        os.kill(workers[1][0], signal.SIGSTOP)  # the run cannot finish
        during = _aws_leftovers(name, settings)
        assert during["queues"] and during["objects"] and during["subscriptions"]  # there is something to remove
        os.kill(run.proc.pid, signum)
        if signum == signal.SIGTERM:
            rc, _, err = run.finish(120)
            assert rc == 143 and "terminated (SIGTERM)" in err, err
        else:
            run.proc.wait(30)
            os.kill(workers[1][0], signal.SIGCONT)
            assert _until(lambda: not _marked(run.marker), 15), "workers outlived their coordinator"
            done = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "clean"], capture_output=True,
                                  env=_env(run.tmp, run.marker), text=True, timeout=120)
            assert done.returncode == 0 and "removed leftovers of dead run" in done.stdout, done
        assert _until(lambda: not _marked(run.marker), 15)
        assert _aws_leftovers(name, settings) == {"objects": [], "queues": [], "subscriptions": []}
        assert run.leftovers() == []
    finally:
        deploy.teardown(deploy.DeploySettings(name=name, topics=1), settings)


def test_a_queue_run_killed_while_it_creates_its_queues_leaves_what_clean_removes(aws, runs, tmp_path):
    """The coordinator SIGKILLed inside the channel's create_run (its queues and subscriptions
    made, the probes not yet through): its record must already say what to delete."""
    from fsd_runtime.aws import deploy
    from fsd_runtime.aws.clients import AwsSettings

    settings = AwsSettings(region="us-east-1", endpoint_url=aws.endpoint_url)
    name = f"fsd-mk-{uuid.uuid4().hex[:6]}"
    deploy.deploy(deploy.DeploySettings(name=name, topics=1, lambda_function=False), settings)
    aws.swallow_publishes(100_000)  # the probes never arrive: create_run waits for them
    try:
        run = runs(tmp_path, "--workers", "2", "--images", "20", "--channel", "queue", "--invoker", "local",
                   "--deployment", name, "--endpoint-url", aws.endpoint_url, "--region", "us-east-1")
        assert _until(lambda: len(_aws_leftovers(name, settings)["subscriptions"]) == 2, 120, step=0.05)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(30)
        aws.faults.clear()
        done = subprocess.run([sys.executable, "-m", "fsd_runtime.cli", "clean"], capture_output=True,
                              env=_env(run.tmp, run.marker), text=True, timeout=120)
        assert done.returncode == 0 and "removed leftovers of dead run" in done.stdout, done
        assert _aws_leftovers(name, settings) == {"objects": [], "queues": [], "subscriptions": []}
        assert run.leftovers() == []
    finally:
        aws.faults.clear()
        deploy.teardown(deploy.DeploySettings(name=name), settings)


def test_planning_a_large_run_shows_progress_and_answers_sigint(tmp_path):
    """--workers 128: stage lines while planning; Ctrl-C there ends the run at once (exit 130)."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "fsd_runtime.cli", "run", "--workers", "128"],
                            env=_env(str(tmp_path), marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "planning the workers' shares" in line:
                break
        assert any("partitioning 120 layers over 128 workers" in line for line in seen), seen
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest = proc.stderr.read()
        proc.wait(60)
        assert proc.returncode == 130 and "interrupted (SIGINT)" in rest, rest
        assert time.monotonic() - sent < 10, "planning ignored SIGINT"
        assert not [n for n in os.listdir(tmp_path) if n.startswith("fsd-")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_up_skew_never_counts_against_the_receive_timeout(runs, tmp_path):
    """Worker 2 is held back (SIGSTOP) until the others have waited for it longer than
    --receive-timeout: a slow start is not a silent peer; the run completes, golden."""
    run = runs(tmp_path, "--workers", "3", "--images", "500", "--receive-timeout", "3")
    workers = run.workers_started(3)
    # worker 2 listens (it binds its socket before it loads the kernels), then stops: the others
    # can send it layer 1's rows and wait in layer 1's receive
    assert _until(lambda: glob.glob(os.path.join(run.tmp, "fsd-*", "2.sock")), 120, step=0.001)
    os.kill(workers[2][0], signal.SIGSTOP)
    waiting = _until(lambda: all(_beacons(run.tmp).get(w, (0, -1))[1] >= 1 for w in (0, 1)), 120)
    assert waiting, "workers 0 and 1 never reached layer 1"
    time.sleep(6)  # well past the 3 s receive timeout (3 s, not less: a loaded machine may
    # starve a worker between two layers for a second or two)
    os.kill(workers[2][0], signal.SIGCONT)
    rc, out, err = run.finish(120)
    assert rc == 0 and "golden match: yes" in out, err


def test_a_beacon_is_locked_before_the_coordinator_can_see_it(tmp_path, monkeypatch):
    """The coordinator reports a worker dead when it can lock the worker's beacon; a beacon
    visible under its name before its worker locked it read as a dead worker (seen under load:
    a live forked worker "died during start-up")."""
    import fcntl

    record = liveness.RunRecord("beaconrace" + "0" * 6, base=str(tmp_path))
    final = os.path.join(record.dir, "workers", "7")
    seen_before_lock = []
    real_flock = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not op & fcntl.LOCK_NB:
            seen_before_lock.append(os.path.exists(final) and record.dead_workers().get(7) is not None)
        return real_flock(fd, op)

    monkeypatch.setattr(liveness.fcntl, "flock", flock)
    try:
        beacon = liveness.Beacon(record.dir, 7)
        monkeypatch.setattr(liveness.fcntl, "flock", real_flock)
        assert seen_before_lock == [False]
        assert record.dead_workers() == {}  # locked and visible: alive
        os.close(beacon.fd)
        assert record.dead_workers() == {7: -1}  # its process gone: dead, at start-up
        assert sorted(os.listdir(os.path.join(record.dir, "workers"))) == ["7"]
    finally:
        record.close()


# --- a dead coordinator's record, removed while its workers still write ---

def _dead_run_store(tmp_path):
    """A run record whose coordinator is gone (lock free), its store with a share, and the store
    as its workers open it."""
    from fsd_runtime import storage

    record = liveness.RunRecord("deadwrite" + "0" * 7, base=str(tmp_path))
    store = storage.LocalStorage(record.store_dir)
    store.put("runs/r/shares/0.npz", b"x" * 1000)
    record.update(storage=store.config(), prefix="runs/r", n_workers=2)
    os.close(record._lock)  # the coordinator is gone
    return record, storage.make_storage(store.config())


def test_a_worker_write_after_its_dead_runs_store_was_checked_does_not_recreate_it(tmp_path, monkeypatch):
    """A worker's error record written just as another worker of the run (whose coordinator
    died) removes the run's record: the store is not re-created, nothing stays behind."""
    from fsd_runtime import storage

    record, worker_store = _dead_run_store(tmp_path)
    real_isdir, removed = os.path.isdir, []

    def isdir(path):
        answer = real_isdir(path)
        if path == worker_store.root and answer and not removed:  # right after the check
            removed.append(path)
            liveness._remove_local(record.dir)
        return answer

    monkeypatch.setattr(os.path, "isdir", isdir)
    with pytest.raises(storage.StorageError, match="is gone"):
        worker_store.put("runs/r/errors/1.json", b"{}")
    monkeypatch.undo()
    assert removed and os.listdir(tmp_path) == []


def test_a_worker_write_while_its_dead_runs_record_is_removed_leaves_nothing(tmp_path, monkeypatch):
    """The same write landing while the removal walks the tree (after it listed the run's
    directory): the record is moved aside first, so the write fails instead of staying."""
    from fsd_runtime import storage

    record, worker_store = _dead_run_store(tmp_path)
    real_scandir, written = os.scandir, []

    class Listed(list):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def close(self):
            pass

    def scandir(*args):
        with real_scandir(*args) as it:
            entries = Listed(it)
        if not written and "shares" in [e.name for e in entries]:  # the run's directory, listed
            try:
                worker_store.put("runs/r/errors/1.json", b"{}")
                written.append("stored")
            except storage.StorageError:
                written.append("refused")
        return entries

    monkeypatch.setattr(os, "scandir", scandir)
    liveness._remove_local(record.dir)
    monkeypatch.undo()
    assert written and os.listdir(tmp_path) == [], written


def test_a_worker_ending_while_its_watcher_removes_the_dead_runs_files_waits_for_it(tmp_path):
    """A worker whose coordinator died ends on its own too (its peers and sockets go): its end
    must not cut short its watcher's removal of the run's files."""
    record = liveness.RunRecord("cutshort" + "0" * 8, base=str(tmp_path))
    script = (
        "import os, sys, threading, time\n"
        "from fsd_runtime import liveness\n"
        "removing, real = threading.Event(), liveness.shutil.rmtree\n"
        "def slow(path, *args, **kwargs):\n"
        "    removing.set(); time.sleep(0.5); return real(path, *args, **kwargs)\n"
        "liveness.shutil.rmtree = slow\n"
        "liveness.start_worker(0)\n"
        "print('ready', flush=True)\n"
        "removing.wait(30)\n"
        "getattr(liveness, 'before_exit', lambda: None)()  # as a forked worker's end\n"
        "os._exit(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**_env(str(tmp_path), "cutshort"), liveness.ENV: record.dir})
    try:
        assert proc.stdout.readline() == "ready\n"
        os.close(record._lock)  # the coordinator dies
        assert proc.wait(30) == liveness.ORPHAN_EXIT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.listdir(tmp_path) == []


def test_a_dead_runs_record_left_half_removed_is_swept_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its remover is gone
    left = tmp_path / f"fsd-run-0123abcd-xyz.gone-{dead.pid}" / "store" / "runs"
    left.mkdir(parents=True)
    (left / "x").write_bytes(b"x")
    assert len(liveness.sweep(str(tmp_path))) == 1 and os.listdir(tmp_path) == []


def test_a_record_its_remover_is_still_removing_is_left_to_it(tmp_path):
    """Moved aside by a live process (this one) a moment ago: not swept, nor reported as removed.
    Untouched for the stale time, it is swept even so (its pid may be another process's now)."""
    record = tmp_path / f"fsd-run-0123abcd-xyz.gone-{os.getpid()}"
    (record / "store").mkdir(parents=True)
    assert liveness.sweep(str(tmp_path)) == [] and record.exists()
    old = time.time() - liveness._STALE_SECONDS - 5
    os.utime(record, (old, old))
    assert len(liveness.sweep(str(tmp_path))) == 1 and os.listdir(tmp_path) == []


def test_a_coordinator_killed_while_it_removes_its_record_leaves_what_the_next_sweep_removes(tmp_path):
    script = (
        "import os, sys\n"
        "from fsd_runtime import liveness\n"
        "record = liveness.RunRecord('killedclose' + '0' * 5, base=sys.argv[1])\n"
        "real = os.unlink\n"
        "def unlink(path, *args, **kwargs):\n"
        "    real(path, *args, **kwargs)\n"
        "    if os.path.basename(str(path)) == 'run.json':\n"
        "        os.kill(os.getpid(), 9)  # SIGKILL, half-way through the removal\n"
        "os.unlink = unlink\n"
        "record.close()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_env(str(tmp_path), "killedclose"),
                          timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert os.listdir(tmp_path) != []  # (what it left)
    assert len(liveness.sweep(str(tmp_path))) == 1 and os.listdir(tmp_path) == []


def test_a_signal_during_the_clean_up_waits_for_it_in_a_process_with_threads():
    """The coordinator has threads besides its main one once the kernels are loaded: a signal
    handed to one of those must not cut the run's clean-up short (queues and objects stayed,
    and the record that `clean` would have found was gone)."""
    script = (
        "import os, signal, threading, time\n"
        "from fsd_runtime import liveness\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "got = []\n"
        "try:\n"
        "    with liveness.signals_deferred():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.3)\n"
        "        got.append('cleaned up')\n"
        "except KeyboardInterrupt:\n"
        "    got.append('interrupted')\n"
        "print(got)\n")
    done = subprocess.run([sys.executable, "-c", script], env=_env(os.environ.get("TMPDIR", "/tmp"), "deferred"),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "['cleaned up', 'interrupted']\n", done


@pytest.mark.parametrize("lands_at", [2, 3, 4])  # the 2nd swap on entry, after the 1st / 2nd put back
def test_a_signal_landing_while_handlers_are_swapped_leaves_the_real_ones(monkeypatch, lands_at):
    """A signal whose handler raises can land between two ``signal.signal`` calls of
    ``signals_deferred``: whatever it interrupts, both real handlers are in place afterwards
    (SIGINT was left noting forever, silently ignored)."""
    real, calls = signal.signal, []
    originals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def landing(signum, handler):
        calls.append(signum)
        if len(calls) == lands_at == 2:  # before the swap: SIGTERM's own handler raises
            raise KeyboardInterrupt
        previous = real(signum, handler)
        if len(calls) == lands_at:       # just after a handler is put back: it runs at once
            raise KeyboardInterrupt
        return previous

    monkeypatch.setattr(signal, "signal", landing)
    with pytest.raises(KeyboardInterrupt):
        with liveness.signals_deferred():
            pass
    monkeypatch.undo()
    assert {s: signal.getsignal(s) for s in originals} == originals


def test_an_interrupted_prepare_says_its_model_is_removed_and_leaves_no_directory(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.Popen([sys.executable, "-m", "fsd_runtime.cli", "prepare", "--synthetic", "4096x480",
                             "--workers", "8", "--out", str(out)],
                            env=_env(str(tmp_path), uuid.uuid4().hex), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if "prepared 100 of 480 layers" in line:  # under way: some segments are written
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        proc.wait(60)
        assert proc.returncode == 130, rest
        said = [line for line in rest.splitlines() if "interrupted" in line]
        assert said == ["fsd-inference: interrupted (SIGINT); the model being prepared is removed"], rest
        assert "Traceback" not in rest
        assert not out.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
