"""Prove a built Lambda layer the way Lambda runs it: ``scripts/prove_layer.py [--arch x86_64|arm64|all]``.

For each architecture, inside that architecture's Debian root (scripts/rootfs.sh;
arm64 under qemu-user) whose proof venv holds awslambdaric and nothing else
(no numpy, no numba):

1. unzip ``dist/fsd-inference-layer-<arch>-py<ver>.zip`` into a clean ``/opt``
   (Lambda's layer path: ``/opt/python`` holds the layer's packages);
2. check numba cannot be imported there at all;
3. ``python -m fsd_runtime.selftest --require-native`` with only the layer on the path;
4. the selftest as a Lambda function: ``aws-lambda-rie`` + ``python -m awslambdaric
   fsd_runtime.selftest.handler``, invoked once on 127.0.0.1 (cold start measured
   from starting RIE to the answer);
5. the real handler: an RIE pool running ``fsd_runtime.aws.handler.handler`` per
   worker, driven by the coordinator, all inside the root with only the layer on
   the path (local storage and channel), its categories matched against the golden ones.

Prints one JSON report (also written with ``--json FILE``); exits 1 if any check fails.
Needs root (chroot, mounts). Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import ExitStack, contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEB_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROOF_PYTHON = "/opt/proof/bin/python"
RIE_IN_ROOT = "/usr/local/bin/aws-lambda-rie"


class ProofError(RuntimeError):
    """A check of the layer failed; the message says which."""


def root_of(arch: str) -> str:
    done = subprocess.run([os.path.join(REPO, "scripts", "rootfs.sh"), DEB_ARCH[arch]],
                          stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise ProofError(f"scripts/rootfs.sh {DEB_ARCH[arch]} failed (status {done.returncode})")
    return done.stdout.strip().splitlines()[-1]


def in_root(root: str, *command: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in the root with a clean environment plus ``env``."""
    pairs = [f"{k}={v}" for k, v in {"HOME": "/root", "LANG": "C.UTF-8", "PATH": ROOT_PATH,
                                     **(env or {})}.items()]
    return subprocess.run(["chroot", root, "/usr/bin/env", "-i", *pairs, *command],
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def mounted(root: str):
    """/proc and /dev inside the root (Python, RIE and the selftest's /proc/self/stat need them),
    and /opt/python read-only as on Lambda."""
    done = []
    try:
        for source, target, args in (("proc", "proc", ["-t", "proc"]), ("/dev", "dev", ["--bind"])):
            path = os.path.join(root, target)
            subprocess.run(["mount", *args, source, path], check=True)
            done.append(path)
        # The layer read-only, as Lambda mounts /opt: nothing may be written (no bytecode caches).
        layer = os.path.join(root, "opt", "python")
        subprocess.run(["mount", "--bind", layer, layer], check=True)
        done.append(layer)
        subprocess.run(["mount", "-o", "remount,bind,ro", layer], check=True)
        yield
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-l", path], check=False)


def install_layer(root: str, zip_path: str) -> None:
    """Unzip the layer into a clean /opt/python, as Lambda extracts layers into /opt."""
    target = os.path.join(root, "opt", "python")
    shutil.rmtree(target, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        if not names or any(not n.startswith("python/") or ".." in n.split("/") for n in names):
            raise ProofError(f"{zip_path}: every entry must live under python/")
        archive.extractall(os.path.join(root, "opt"))


def check_no_numba(root: str) -> None:
    for module in ("numba", "llvmlite", "scipy"):
        done = in_root(root, PROOF_PYTHON, "-c", f"import {module}", env={"PYTHONPATH": "/opt/python"})
        if done.returncode == 0:
            raise ProofError(f"{module} is importable next to the layer: the proof would not be clean")


def run_selftest(root: str, images: int) -> dict:
    done = in_root(root, PROOF_PYTHON, "-m", "fsd_runtime.selftest", "--json", "--require-native",
                   "--images", str(images), env={"PYTHONPATH": "/opt/python"})
    if not done.stdout.strip():
        raise ProofError(f"selftest printed nothing (status {done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0:
        raise ProofError(f"selftest failed: {report}")
    return report


def rie_wrapper(root: str, directory: str) -> str:
    """A host executable that runs aws-lambda-rie inside the root, passing on Lambda's variables."""
    forwarded = ["AWS_LAMBDA_FUNCTION_TIMEOUT", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"]
    pairs = " ".join(f'{name}="${{{name}}}"' for name in forwarded)
    path = os.path.join(directory, "rie-in-root")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"exec chroot {shlex.quote(root)} /usr/bin/env -i HOME=/root LANG=C.UTF-8 "
                f"PATH={ROOT_PATH} PYTHONPATH=/opt/python LAMBDA_TASK_ROOT=/var/task "
                f"AWS_LAMBDA_FUNCTION_NAME=fsd-inference-proof {pairs} {RIE_IN_ROOT} \"$@\"\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def invoke(endpoint: str, payload: dict, timeout: float) -> dict:
    from fsd_runtime.aws.invokers import RIE_INVOKE_PATH

    host, port = endpoint.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", RIE_INVOKE_PATH, body=json.dumps(payload).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise ProofError(f"RIE answered HTTP {response.status}: {body[:500]!r}")
    answer = json.loads(body)
    if not isinstance(answer, dict) or "errorMessage" in answer:
        raise ProofError(f"the function failed under RIE: {answer}")
    return answer


def selftest_under_rie(root: str, wrapper: str, images: int, log_dir: str) -> dict:
    from fsd_runtime.aws.invokers import RiePool

    started = time.perf_counter()
    with RiePool(1, binary=wrapper, python=PROOF_PYTHON, handler="fsd_runtime.selftest.handler",
                 log_dir=log_dir) as pool:
        try:
            report = invoke(pool.endpoints[0], {"images": images}, timeout=600)
        except (ProofError, OSError) as exc:
            raise ProofError(f"{exc}\n{pool.logs()[-3000:]}") from None
        cold = time.perf_counter() - started
    if not (report["native"] and not report["numba_loaded"] and report["golden_match"]
            and report["codec_compressor"] == "zstd"):
        raise ProofError(f"selftest under RIE failed: {report}")
    return {**report, "rie_start_to_answer_seconds": round(cold, 3)}


# Runs inside the root with only the layer on the path: the coordinator and every worker use the
# layer's own code (no skew with the host's tree). argv: images, workers, RIE binary.
HANDLER_DRIVER = r"""
import json, sys
import numpy as np
import fsd_kernels
from fsd_runtime import model
from fsd_runtime.coordinator import run_distributed
from fsd_runtime.aws.invokers import RiePool, register

register()
images, workers, binary = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = model.embedded()
subset = data.images.rows(0, images)
golden = data.categories[data.categories < images]
net = data.network.pack()
with RiePool(workers, binary=binary, python=sys.executable) as pool:
    try:
        result = run_distributed(net, subset.arrays, workers, launcher=pool.launcher_config(),
                                 channel={"kind": "local"}, run_timeout=600, receive_timeout=300)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "logs": pool.logs()[-3000:]}))
        sys.exit(1)
print(json.dumps({"workers": workers, "images": images, "categories": len(golden),
                  "golden_match": bool(np.array_equal(result.categories, golden)),
                  "coordinator_backend": fsd_kernels.backend,
                  "numba_loaded": "numba" in sys.modules,
                  "startup_seconds": round(result.timings["startup_s"], 3),
                  "launch_to_done_seconds": round(result.timings["launch_to_done_s"], 3)}))
"""


def handler_under_rie(root: str, images: int, workers: int) -> dict:
    """Coordinator and workers in the root; each worker is ``fsd_runtime.aws.handler.handler`` under RIE."""
    done = in_root(root, PROOF_PYTHON, "-c", HANDLER_DRIVER, str(images), str(workers), RIE_IN_ROOT,
                   env={"PYTHONPATH": "/opt/python"}, timeout=900)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise ProofError(f"handler run printed nothing (status {done.returncode}): {done.stderr[-3000:]}")
    report = json.loads(lines[-1])
    if done.returncode != 0 or "error" in report:
        raise ProofError(f"handler run failed: {report.get('error')}\n{report.get('logs', '')}")
    if not report["golden_match"] or report["numba_loaded"]:
        raise ProofError(f"handler run is not a clean golden match: {report}")
    return report


def prove(arch: str, python_version: str, images: int, workers: int) -> dict:
    zip_path = os.path.join(REPO, "dist", f"fsd-inference-layer-{arch}-py{python_version}.zip")
    if not os.path.exists(zip_path):
        raise ProofError(f"{zip_path} is missing: build it with ./layer.zip.sh --arch {arch}")
    from fsd_runtime.aws.invokers import rie_binary

    root = root_of(arch)
    report = {"arch": arch, "python": python_version, "layer": os.path.basename(zip_path),
              "host": platform.machine()}
    shutil.copy(rie_binary(arch), os.path.join(root, RIE_IN_ROOT.lstrip("/")))
    install_layer(root, zip_path)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="fsd-prove-") as tmp:
        stack.enter_context(mounted(root))
        check_no_numba(root)
        report["selftest"] = run_selftest(root, images)
        wrapper = rie_wrapper(root, tmp)
        os.makedirs(os.path.join(tmp, "selftest"))
        report["selftest_rie"] = selftest_under_rie(root, wrapper, images, os.path.join(tmp, "selftest"))
        report["handler_rie"] = handler_under_rie(root, images, workers)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/prove_layer.py", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["x86_64", "arm64", "all"], default="x86_64")
    parser.add_argument("--python", default="3.13")
    parser.add_argument("--images", type=int, default=1000, help="official images to check")
    parser.add_argument("--workers", type=int, default=2, help="handler workers under RIE")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must run as root (chroot and mounts)")
    arches = ["x86_64", "arm64"] if args.arch == "all" else [args.arch]
    reports, failed = [], False
    for arch in arches:
        try:
            reports.append(prove(arch, args.python, args.images, args.workers))
        except (ProofError, subprocess.SubprocessError) as exc:
            reports.append({"arch": arch, "error": str(exc)})
            failed = True
    text = json.dumps(reports, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
