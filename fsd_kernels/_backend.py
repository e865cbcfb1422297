"""Pick the kernel implementation: the AOT-compiled native module, else numba JIT.

The Lambda layer ships ``fsd_kernels/_native*.so`` (every kernel named in
the ``EXPORTS`` of the modules in ``CORE_MODULES``) and no numba; a
developer install has numba and no native module.
``FSD_KERNELS_BACKEND=native|jit`` forces one (and fails clearly if it is
not there). ``FSD_KERNELS_NATIVE=PATH`` names a native module built elsewhere
(``python -m fsd_kernels._build --out DIR``): how a developer install runs the
Lambda worker path, numba-free, without writing into the package.
"""
import importlib
import importlib.util
import os
import sys
import sysconfig
from types import SimpleNamespace

_CHOICES = ("native", "jit")
#: Modules whose ``EXPORTS`` make up the kernel set (JIT source and AOT build input).
CORE_MODULES = ("fsd_kernels._core", "fsd_kernels._codec_core")


def core_modules():
    """The JIT kernel modules (importing them imports numba)."""
    return [importlib.import_module(name) for name in CORE_MODULES]


def _jit_namespace():
    return SimpleNamespace(**{name: getattr(module, name)
                              for module in core_modules() for name in module.EXPORTS})


def _native_from(path: str):
    """The native module from a file outside the package; it must be this Python's build."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if os.path.basename(path) != "_native" + suffix:
        raise ImportError(f"FSD_KERNELS_NATIVE={path!r}: not a build for this Python "
                          f"(expected a file named _native{suffix})")
    if not os.path.isfile(path):
        raise ImportError(f"FSD_KERNELS_NATIVE={path!r}: no such file")
    if "fsd_kernels._native" in sys.modules:
        return sys.modules["fsd_kernels._native"]
    spec = importlib.util.spec_from_file_location("fsd_kernels._native", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["fsd_kernels._native"] = module
    return module


def _load(choice):
    if choice == "native":
        path = os.environ.get("FSD_KERNELS_NATIVE", "").strip()
        return _native_from(path) if path else importlib.import_module("fsd_kernels._native")
    return _jit_namespace()


def load():
    """Return ``(kernels, name)``: an object with every kernel as an attribute, and "native" or "jit"."""
    forced = os.environ.get("FSD_KERNELS_BACKEND", "").strip().lower()
    if forced and forced not in _CHOICES:
        raise ValueError(f"FSD_KERNELS_BACKEND must be one of {_CHOICES}, not {forced!r}")
    if not forced and os.environ.get("FSD_KERNELS_NATIVE", "").strip():
        forced = "native"  # a module named on purpose: never a silent fall-back to the JIT
    errors = []
    for choice in (forced,) if forced else _CHOICES:
        try:
            return _load(choice), choice
        except ImportError as exc:
            errors.append(f"{choice}: {exc}")
    raise ImportError(
        "fsd_kernels has no usable kernels: neither the compiled native module "
        "(built by layer.zip.sh) nor numba for JIT could be loaded ("
        + "; ".join(errors) + ")"
    )


kernels, name = load()
