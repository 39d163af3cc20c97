"""Type stub of the output cache (bnfast/_outputs.pyx)."""
from typing import Any, Union

import numpy as np

MIN_BYTES: int
DEFAULT_LIMIT: int
MAX_BLOCKS: int

def empty(shape: Union[int, tuple[int, ...]], dtype: np.dtype[Any],
          near: Any = ...) -> np.ndarray[Any, Any]: ...
def set_limit(limit: int) -> None: ...
def get_limit() -> int: ...
def info() -> dict[str, int]: ...
