"""Fixtures of the op tests: on a GPU, the Triton kernels run one config each (no autotuning).

Autotuning compiles and times every config of a kernel for every new shape (1-6 s per compile, ~136
compiles over the cot_head cases): minutes of a short GPU lease spent choosing configs instead of
checking results. The tests pin the first config of each list (the interpreter's); the benchmarks
autotune and print the configs they chose. On CPU the interpreter's lists hold one config already.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _pin_triton_configs():
    if not torch.cuda.is_available():
        yield
        return
    from carft_mega._ext import triton_kernels

    kernels = triton_kernels("cot_head")
    before = kernels.autotune_enabled()
    kernels.set_autotune(False)
    yield
    kernels.set_autotune(before)
