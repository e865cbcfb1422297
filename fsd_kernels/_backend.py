"""Pick the kernel implementation: the AOT-compiled native module, else numba JIT.

The Lambda layer ships ``fsd_kernels/_native*.so`` (every kernel named in
the ``EXPORTS`` of the modules in ``CORE_MODULES``) and no numba; a
developer install has numba and no native module.
``FSD_KERNELS_BACKEND=native|jit`` forces one (and fails clearly if it is
not there).
"""
import importlib
import os
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


def _load(choice):
    if choice == "native":
        return importlib.import_module("fsd_kernels._native")
    return _jit_namespace()


def load():
    """Return ``(kernels, name)``: an object with every kernel as an attribute, and "native" or "jit"."""
    forced = os.environ.get("FSD_KERNELS_BACKEND", "").strip().lower()
    if forced and forced not in _CHOICES:
        raise ValueError(f"FSD_KERNELS_BACKEND must be one of {_CHOICES}, not {forced!r}")
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
