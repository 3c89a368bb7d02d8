"""Triton kernels of the training step, each a leaf module: a kernel and the launcher of already-validated
tensors, importing nothing of bsim_fast (`bsim_fast.mix` and `bsim_fast.augment` validate and dispatch; their
PyTorch references are the oracles). `bsim_fast/tools/kernel_bench.py` times each kernel against its
reference and a plain device copy, `tools/ptx.py` reads the PTX compiled for sm_90 (and ptxas's registers and
spills) and `tools/counting.py` counts launches and bytes (docs/BENCHMARKS.md, "Kernels").

On a machine without a GPU the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before these modules are imported (``@triton.jit`` reads it when it decorates a kernel), so before
`bsim_fast.augment`, which imports `photometric` for the names of its uniforms' columns.
"""

import os

import torch

_ON = ("1", "true", "yes", "on")


def use_triton(device: torch.device) -> bool:
    """Whether bsim_fast runs its Triton kernels for tensors on `device`: always on CUDA; on the CPU when
    ``BSIM_FAST_TRITON=1`` is set, under ``TRITON_INTERPRET=1`` (how CI tests the kernels and counts what the
    GPU path launches). Read at every call, so a test can switch it."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or os.environ.get("BSIM_FAST_TRITON", "0").strip().lower() not in _ON:
        return False
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _ON:
        raise RuntimeError(
            "BSIM_FAST_TRITON=1 runs the Triton kernels on CPU tensors only under TRITON_INTERPRET=1 "
            "(set both before Python starts)"
        )
    return True
