"""The AOT-compiled native kernel module (fsd_kernels._native), built once for the host Python
and cached by the hash of the kernel sources; shared by the native and differential tests."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig

import numpy as np
import pytest

from fsd_kernels import _backend, _build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernel_hash() -> str:
    digest = hashlib.sha256()
    import numba

    digest.update(f"{sys.version}|{numba.__version__}|{np.__version__}|{platform.machine()}".encode())
    # What the module is compiled from: the kernel modules (and what they import) and the build.
    names = [m.rsplit(".", 1)[1] + ".py" for m in _backend.CORE_MODULES] + ["_build.py", "_codec_codes.py"]
    for name in sorted(names):
        path = os.path.join(REPO, "fsd_kernels", name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def native_so() -> str:
    """Path of the host-Python native module, built once per kernel-source hash."""
    cache = os.environ.get("FSD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fsd-inference")
    out = os.path.join(cache, "native-test", _kernel_hash())
    path = os.path.join(out, "_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(path):
        staging = out + f".partial-{os.getpid()}"
        os.makedirs(staging, exist_ok=True)
        built = _build.build(staging, _build.default_cpu())
        os.makedirs(out, exist_ok=True)
        os.replace(built, path)
        shutil.rmtree(staging, ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def native_module(native_so):
    spec = importlib.util.spec_from_file_location("_native", native_so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def native_kernels(native_module):
    """A context manager that runs the public API (infer, pack, layer) on the native module."""
    import fsd_kernels  # noqa: F401  (its modules: the package names its functions infer, layer)

    @contextlib.contextmanager
    def swap():
        users = [sys.modules[f"fsd_kernels.{name}"] for name in ("infer", "layer", "network")]
        saved = [m.kernels for m in users]
        for m in users:
            m.kernels = native_module
        try:
            yield native_module
        finally:
            for m, k in zip(users, saved):
                m.kernels = k

    return swap
