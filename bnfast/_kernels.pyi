"""Type stub of the compiled kernels (bnfast/_kernels.pyx).

The entry points take keyword arguments by these names.  Arrays are
``numpy.ndarray``; which dtypes and sizes each one must have is in the
docstrings of _kernels.pyx.  Wrong dtypes or sizes raise TypeError or
ValueError; a failed allocation of kernel work space raises MemoryError.
_kernels_avx2 and _kernels_avx512 are the same code compiled with other flags
(their stubs re-export this one).
"""
from typing import Any, Optional

import numpy as np

_Array = np.ndarray[Any, np.dtype[Any]]

def train_forward(x: _Array, cache: Optional[_Array], y: _Array, n: int, d: int,
                  gamma: _Array, beta: _Array, eps: float,
                  mean: _Array, var: _Array, invstd: Optional[_Array],
                  rm_old: Optional[_Array], rm_new: Optional[_Array],
                  rv_old: Optional[_Array], rv_new: Optional[_Array],
                  momentum: float, one_minus_momentum: float) -> None: ...
def eval_forward(x: _Array, y: _Array, n: int, d: int,
                 gamma: _Array, beta: _Array, rm: _Array, rv: _Array,
                 eps: float) -> None: ...
def train_backward(x: _Array, dy: _Array, dx: _Array, n: int, d: int,
                   mean: _Array, invstd: _Array, gamma: _Array,
                   dgamma: _Array, dbeta: _Array) -> None: ...
def eval_backward(x: _Array, dy: _Array, dx: _Array, n: int, d: int,
                  gamma: _Array, rm: _Array, rv: _Array, eps: float,
                  dgamma: _Array, dbeta: _Array) -> None: ...
def plain_batch(x: object) -> int: ...
def plain_vector(v: object, d: int, like: _Array, or_f64: bool = False) -> bool: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def openmp_enabled() -> bool: ...
def build_flags() -> str: ...
def cpu_level() -> int: ...
def _set_tuning(strip_bytes: int = ..., min_strip: int = ..., stream_min_bytes: int = ...,
                col_block: int = ..., fused_strips: bool = ..., page_bytes: int = ...,
                stream_pages: bool = ...) -> None: ...
