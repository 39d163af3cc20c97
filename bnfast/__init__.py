"""bnfast: batch normalization for NumPy on typed Cython kernels.

``BatchNormalization`` is a drop-in replacement for the class of the same name
in *Deep Learning from Scratch*; ``bnfast.functional`` holds the stateless
operations it is built on; ``bnfast.reference`` is the pure-NumPy twin.
"""
from . import _outputs
from ._native import build_info, get_num_threads, set_num_threads
from ._version import __version__
from .functional import (TrainResult, backward_eval, backward_train, forward_eval,
                         forward_train)
from .layer import BatchNormalization

set_output_cache_limit = _outputs.set_limit
get_output_cache_limit = _outputs.get_limit
output_cache_info = _outputs.info

__all__ = [
    "BatchNormalization",
    "TrainResult",
    "__version__",
    "backward_eval",
    "backward_train",
    "build_info",
    "forward_eval",
    "forward_train",
    "get_num_threads",
    "get_output_cache_limit",
    "output_cache_info",
    "set_num_threads",
    "set_output_cache_limit",
]
