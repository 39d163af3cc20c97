"""Type stub of bnfast._kernels_avx512: the kernels of _kernels.pyx compiled for
avx512 CPUs (see _kernels.pyi).  Built on x86-64 with GCC/Clang only."""
from ._kernels import _grid_info as _grid_info
from ._kernels import _set_tuning as _set_tuning
from ._kernels import affine as affine
from ._kernels import build_flags as build_flags
from ._kernels import cpu_level as cpu_level
from ._kernels import eval_backward as eval_backward
from ._kernels import eval_forward as eval_forward
from ._kernels import get_num_threads as get_num_threads
from ._kernels import grad_input as grad_input
from ._kernels import grad_sums as grad_sums
from ._kernels import moments as moments
from ._kernels import openmp_enabled as openmp_enabled
from ._kernels import planes_eval_backward as planes_eval_backward
from ._kernels import planes_eval_forward as planes_eval_forward
from ._kernels import planes_train_backward as planes_train_backward
from ._kernels import planes_train_forward as planes_train_forward
from ._kernels import ready_operands as ready_operands
from ._kernels import ready_rows as ready_rows
from ._kernels import ready_vector as ready_vector
from ._kernels import set_num_threads as set_num_threads
from ._kernels import train_backward as train_backward
from ._kernels import train_forward as train_forward
