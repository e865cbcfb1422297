"""fsd_runtime: the thin runtime of FSD-Inference (model, partition, worker loop, channels, launch).

Public API: ``run`` (a whole run, serial or distributed) and its ``InferenceResult``; ``prepare``
(a model partitioned and planned once, for runs with ``prepared=DIR``); ``Network``,
``load_network``, ``save_network``, ``DataError`` for networks users bring. Every Lambda worker and
the CLI import this package, so the names are resolved lazily: ``import fsd_runtime`` imports
nothing heavy (no numpy, numba, scipy or boto3).
"""

#: public name -> the module defining it (imported on first use)
_LAZY = {
    "run": "fsd_runtime.api",
    "InferenceResult": "fsd_runtime.api",
    "Network": "fsd_runtime.model",
    "Csr": "fsd_runtime.model",
    "DataError": "fsd_runtime.model",
    "load_network": "fsd_runtime.model",
    "save_network": "fsd_runtime.model",
    "prepare": "fsd_runtime.prepared",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fsd_runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
