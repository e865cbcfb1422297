"""Invokers: launchers that start workers through the Lambda handler, on Lambda or locally.

Three kinds, all fed the same JSON worker event and all asynchronous (the
call returns once the invoke is accepted; a worker's failure surfaces in
the coordinator through the error record the worker writes to storage):

* ``lambda`` — ``lambda.invoke(InvocationType='Event')`` on the deployed function;
* ``local`` — a local process per worker running ``python -m fsd_runtime.aws.handler``,
  the very handler Lambda runs, with the event on stdin;
* ``rie`` — AWS's own runtime pieces: one ``aws-lambda-rie`` per worker (an RIE
  serves one invocation at a time and crashes on concurrent ones) driving
  ``python -m awslambdaric fsd_runtime.aws.handler.handler``, all on 127.0.0.1.
  RIE runs every invoke synchronously and reports errors in a 200 response
  without ``X-Amz-Function-Error``; :class:`RieInvoker` sends the request,
  returns once it is written, and reads the answer in a thread, mapping an
  error body to a failure, as Lambda's ``Event`` invoke would.

:class:`RiePool` starts and stops the RIE processes; :func:`rie_binary`
fetches the binary through pip from the ``aws-sam-cli`` wheel into a cache
directory (never into the repository).
"""
from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from typing import Mapping, Sequence
from urllib.parse import urlsplit

from fsd_runtime import liveness
from fsd_runtime.events import WorkerEvent
from fsd_runtime.launch import LaunchError, Launcher, ProcessLauncher, register_launcher

HANDLER = "fsd_runtime.aws.handler.handler"
#: Where RIE accepts invocations (the path Lambda's Invoke API uses).
RIE_INVOKE_PATH = "/2015-03-31/functions/function/invocations"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_RIE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


class RieUnavailable(RuntimeError):
    """The aws-lambda-rie binary could not be found or fetched."""


def register() -> None:
    """Make the AWS launcher kinds known to ``make_launcher`` (imported lazily; the storage and
    channel registries know their AWS kinds by path from the start)."""
    register_launcher("lambda", "fsd_runtime.aws.invokers:LambdaInvoker")
    register_launcher("local", "fsd_runtime.aws.invokers:LocalInvoker")
    register_launcher("rie", "fsd_runtime.aws.invokers:RieInvoker")


class LambdaInvoker(Launcher):
    """``{"kind": "lambda", "function": NAME, "aws": AwsSettings.to_dict()}``: Event invokes."""

    def __init__(self, config: Mapping):
        from fsd_runtime.aws import clients as aws

        function = config.get("function")
        if not isinstance(function, str) or not function:
            raise LaunchError(f"lambda launcher needs a 'function' name, got {function!r}")
        try:
            settings = aws.AwsSettings.from_dict(config.get("aws"))
        except (TypeError, ValueError) as exc:
            raise LaunchError(f"lambda launcher config: {exc}") from None
        self.config = dict(config)
        self.function = function
        self._lambda = aws.client("lambda", settings)
        self._call = aws.Caller(settings)

    def launch(self, events: Sequence[WorkerEvent]) -> None:
        from fsd_runtime.channels.base import ChannelError

        for event in events:
            try:
                answer = self._call("Invoke", self._lambda.invoke, FunctionName=self.function,
                                    InvocationType="Event", Payload=event.to_json().encode())
            except ChannelError as exc:
                raise LaunchError(f"cannot invoke {self.function} for worker {event.worker_id}: {exc}") from exc
            if answer.get("StatusCode") != 202:
                raise LaunchError(f"invoke of {self.function} for worker {event.worker_id} was not "
                                  f"accepted (status {answer.get('StatusCode')})")

    @property
    def invocations(self) -> int:
        """Invoke calls made (for the cost model)."""
        return self._call.attempts["Invoke"]


class LocalInvoker(ProcessLauncher):
    """``{"kind": "local"}``: a process per worker running the Lambda handler on its event."""

    entry_module = "fsd_runtime.aws.handler"

    def __init__(self, config: Mapping | None = None, *, own_group: bool = False):
        super().__init__(config or {"kind": "local"}, own_group=own_group)


def _loopback_endpoint(url: str) -> tuple[str, int]:
    """Host and port of an RIE endpoint; only loopback addresses are ever contacted."""
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        port = parts.port if parts else None
    except ValueError:
        port = None
    if parts is None or parts.scheme != "http" or parts.hostname not in _LOOPBACK or port is None:
        raise LaunchError(f"RIE endpoint must be http://127.0.0.1:PORT, got {url!r}")
    return parts.hostname, port


class RieInvoker(Launcher):
    """``{"kind": "rie", "endpoints": [URL of worker 0's RIE, ...]}``: worker w goes to endpoint w."""

    def __init__(self, config: Mapping, *, answer_timeout: float = 3600.0):
        endpoints = config.get("endpoints")
        if not isinstance(endpoints, list) or not endpoints:
            raise LaunchError(f"rie launcher needs a list of 'endpoints', got {endpoints!r}")
        self.config = dict(config)
        self.endpoints = [_loopback_endpoint(url) for url in endpoints]
        self.answer_timeout = answer_timeout
        self._failures: dict[int, str] = {}
        self._threads: list[threading.Thread] = []

    def launch(self, events: Sequence[WorkerEvent]) -> None:
        for event in events:
            if event.worker_id >= len(self.endpoints):
                raise LaunchError(f"no RIE endpoint for worker {event.worker_id} "
                                  f"({len(self.endpoints)} endpoints)")
            host, port = self.endpoints[event.worker_id]
            connection = http.client.HTTPConnection(host, port, timeout=self.answer_timeout)
            try:
                connection.request("POST", RIE_INVOKE_PATH, body=event.to_json().encode(),
                                   headers={"X-Amz-Invocation-Type": "Event",
                                            "Content-Type": "application/json"})
            except OSError as exc:
                connection.close()
                raise LaunchError(f"RIE at {host}:{port} refused worker {event.worker_id}: {exc}") from exc
            thread = threading.Thread(target=self._read_answer, args=(event.worker_id, connection),
                                      name=f"rie-answer-{event.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read_answer(self, worker: int, connection: http.client.HTTPConnection) -> None:
        try:
            response = connection.getresponse()
            failure = rie_failure(response.status, response.read())
        except OSError as exc:
            failure = f"RIE connection lost: {exc}"
        finally:
            connection.close()
        if failure:
            self._failures[worker] = failure

    def failures(self) -> dict[int, str]:
        return dict(self._failures)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=0.1)


def rie_failure(status: int, body: bytes) -> str | None:
    """What went wrong in an RIE answer, or None: RIE says 200 even when the handler raised
    (its body is Lambda's ``{"errorType", "errorMessage"}``); our handler answers ``ok: false``."""
    if status != 200:
        return f"RIE answered HTTP {status}: {body[:300]!r}"
    try:
        answer = json.loads(body or b"null")
    except (ValueError, RecursionError):
        return f"RIE answer is not JSON: {body[:300]!r}"
    if isinstance(answer, dict) and "errorType" in answer:
        return f"{answer['errorType']}: {answer.get('errorMessage', '')}"
    if isinstance(answer, dict) and answer.get("ok") is False:
        return str(answer.get("error", "worker failed"))
    return None


def cache_dir() -> str:
    """Where fetched tools live: ``$FSD_CACHE_DIR`` or ``~/.cache/fsd-inference`` (never the repo)."""
    return os.environ.get("FSD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fsd-inference")


def rie_binary(arch: str | None = None, *, fetch: bool = True) -> str:
    """Path of ``aws-lambda-rie`` for ``arch`` (default: this machine's): ``$FSD_RIE_BINARY``, else
    the cache, else extracted from the ``aws-sam-cli`` wheel that ``pip download`` fetches."""
    override = os.environ.get("FSD_RIE_BINARY")
    if override:
        if not os.access(override, os.X_OK):
            raise RieUnavailable(f"FSD_RIE_BINARY={override} is not an executable file")
        return override
    machine = arch or platform.machine()
    if machine not in _RIE_ARCH:
        raise RieUnavailable(f"no aws-lambda-rie for architecture {machine!r}; known: {sorted(_RIE_ARCH)}")
    name = f"aws-lambda-rie-{_RIE_ARCH[machine]}"
    path = os.path.join(cache_dir(), "rie", name)
    if os.access(path, os.X_OK):
        return path
    if not fetch:
        raise RieUnavailable(f"{path} is not there; fetch it with python -m fsd_runtime.aws.invokers")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                               ":all:", "--dest", tmp, "aws-sam-cli"],
                              capture_output=True, text=True, timeout=900)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise RieUnavailable(f"pip download aws-sam-cli failed: {done.stderr.strip()[-500:]}")
        member = f"samcli/local/rapid/{name}"
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            if member not in wheel.namelist():
                raise RieUnavailable(f"{wheels[0]} has no {member}")
            staged = os.path.join(tmp, name)
            with wheel.open(member) as src, open(staged, "wb") as dst:
                dst.write(src.read())
        os.chmod(staged, 0o755)
        os.replace(staged, path)
    return path


def _free_port(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (which it joins)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _wait_listening(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(f"aws-lambda-rie exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise LaunchError(f"aws-lambda-rie did not listen on 127.0.0.1:{port} in time")


def _children(pid: int) -> list[int]:
    """Ids of the processes whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


#: Runs before each RIE (``python -I -c``, then exec): the RIE is SIGKILLed when the thread that
#: started the pool ends, however it ends (Linux's PR_SET_PDEATHSIG follows the thread; pools are
#: started from the coordinator's main thread, so that is the process; elsewhere nothing
#: changes). An idle runtime exits by itself once its RIE is gone; one inside an invocation,
#: when that returns.
_DIE_WITH_PARENT = (
    "import os, signal, sys\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (ImportError, OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # its parent ended already\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


class RiePool:
    """One ``aws-lambda-rie`` + ``awslambdaric`` per worker on 127.0.0.1; a context manager.

    ``env`` is added to this process's environment (e.g. ``PYTHONPATH`` of an
    unzipped layer, the AWS endpoint of a local server); ``python`` is the
    interpreter that runs ``awslambdaric``. The RIE logs go to ``log_dir``.
    """

    def __init__(self, size: int, *, binary: str | None = None, python: str = sys.executable,
                 env: Mapping[str, str] | None = None, handler: str = HANDLER,
                 timeout_s: int = 900, memory_mb: int = 2048, log_dir: str | None = None):
        if not 1 <= size <= 256:
            raise LaunchError(f"an RIE pool holds 1..256 processes, not {size}")
        self.size = size
        self.binary = binary or rie_binary()
        self.python = python
        self.handler = handler
        self.env = {**os.environ, **(env or {}), "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout_s),
                    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb)}
        # its own log directory is a run record (locked while the pool lives): what a pool whose
        # process was killed left is removed by the next run or `fsd-inference clean`
        self._record = liveness.RunRecord("riepool0") if log_dir is None else None
        self.log_dir = log_dir or self._record.dir
        self.endpoints: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def start(self) -> "RiePool":
        deadline = time.monotonic() + 30
        taken: set[int] = set()
        try:
            for index in range(self.size):
                invoke_port, runtime_port = _free_port(taken), _free_port(taken)
                log = open(os.path.join(self.log_dir, f"rie-{index}.log"), "wb")
                with log:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid()),
                         self.binary, "--runtime-interface-emulator-address", f"127.0.0.1:{invoke_port}",
                         "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--log-level", "error",
                         self.python, "-m", "awslambdaric", self.handler],
                        env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True)
                self._procs.append(proc)
                _wait_listening(invoke_port, proc, deadline)
                self.endpoints.append(f"http://127.0.0.1:{invoke_port}")
        except BaseException:
            self.close()
            raise
        return self

    def launcher_config(self) -> dict:
        """The ``rie`` launcher config naming this pool (goes into every worker event)."""
        return {"kind": "rie", "endpoints": list(self.endpoints)}

    def logs(self) -> str:
        """The pool's RIE and handler output, for error messages."""
        texts = []
        for name in sorted(n for n in os.listdir(self.log_dir) if n.endswith(".log")):
            with open(os.path.join(self.log_dir, name), "rb") as f:
                texts.append(f"--- {name}\n{f.read().decode(errors='replace')}")
        return "\n".join(texts)

    def close(self) -> None:
        """Stop every RIE and the runtime it started (RIE puts the runtime in a process group
        of its own, so both groups are killed); remove the log directory if the pool made it."""
        for proc in self._procs:
            for group in [proc.pid, *_children(proc.pid)]:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
        self._procs.clear()
        self.endpoints.clear()
        if self._record is not None:
            self._record.close()
            self._record = None

    def __enter__(self) -> "RiePool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m fsd_runtime.aws.invokers [--arch x86_64|arm64]``: fetch aws-lambda-rie, print its path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", choices=sorted(set(_RIE_ARCH.values())), default=None)
    args = parser.parse_args(argv)
    try:
        print(rie_binary(args.arch))
    except RieUnavailable as exc:
        print(f"fsd_runtime.aws.invokers: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
