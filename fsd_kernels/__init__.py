"""fsd_kernels: exact, fast sparse-DNN kernels (Graph Challenge semantics).

Y_{l+1} = min(max(Y_l W_l + b_l, 0), ymax), with the bias added where the
float32 sum Y_l W_l (ascending input order) is numerically nonzero, as the
reference inferenceReLUvec.m does. Public entry points validate their
arguments; ``fsd_kernels.kernels`` is the raw compiled backend
(``fsd_kernels.backend`` says which: "native" or "jit").
"""
from fsd_kernels._backend import kernels, name as backend
from fsd_kernels import codec
from fsd_kernels.infer import Activations, LayerOverflowError, infer
from fsd_kernels.layer import layer
from fsd_kernels.network import YMAX, PackedNetwork, pack

__all__ = ["Activations", "LayerOverflowError", "PackedNetwork", "YMAX", "backend", "codec", "infer", "kernels", "layer", "pack"]
