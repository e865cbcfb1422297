"""Numbers of the activation-message format shared by the codec kernels and :mod:`fsd_kernels.codec`.

Kept apart from :mod:`fsd_kernels._codec_core` because that module imports
numba, which the Lambda layer does not ship: the codec reads these numbers
on the worker path, the kernels come from the compiled native module there.
"""

# Row record kinds (low three bits of a row tag; tag 0 alone = "same images as the previous row").
KIND_LIST = 1
KIND_BITMAP = 2
KIND_RUN = 3
KIND_COPY = 4
KIND_BITS = 3
# Value section modes (first byte of the section).
VALUES_RAW = 0
VALUES_CONST = 1
VALUES_DICT = 2
#: Largest value dictionary (codes are one byte up to 256 entries, two above).
DICT_MAX = 65536
#: A dictionary is used only when every entry serves this many values on average.
DICT_MIN_USES = 4

# Error codes returned by the decoding kernels (see codec._KERNEL_ERRORS).
E_TRUNCATED = -1
E_VARINT = -2
E_NEURON_RANGE = -3
E_NO_PREVIOUS = -4
E_IMAGE_RANGE = -5
E_EMPTY_ROW = -6
E_TOO_MANY = -7
E_VALUE_MODE = -8
E_DICT = -9
E_TRAILING = -10
E_UNEXPECTED_NEURON = -11
E_TOO_FEW = -12
E_ROW_KIND = -13
E_DICT_ORDER = -14
E_COPY = -15
