"""The one place that decides how a step computes from `train.precision` and the device.

The trainer's step, the k-NN monitor, `eval` and the tools all take a `Precision` from `precision_for`, so a
checkpoint trained in fp16 is evaluated in fp16, and a benchmark times the dtypes the trainer uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """How one device computes a recipe's step: autocast (CUDA only; a CPU runs fp32, where bf16 autocast is
    slower than fp32), the dtype of the normalised views, and whether the fp16 loss scaler runs."""

    device_type: str  # "cuda" or "cpu"
    amp_dtype: torch.dtype  # what train.precision names

    @property
    def autocast(self) -> bool:
        return self.device_type == "cuda" and self.amp_dtype != torch.float32

    @property
    def view_dtype(self) -> torch.dtype:
        """The dtype `cutmix_normalize` writes: the autocast dtype, so the first conv reads no cast copy."""
        return self.amp_dtype if self.autocast else torch.float32

    @property
    def grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return self.autocast and self.amp_dtype == torch.float16

    def autocast_context(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.autocast)


def precision_for(name: str, device: torch.device | str) -> Precision:
    """`train.precision` (bf16, fp16 or fp32) on `device`."""
    return Precision(torch.device(device).type, DTYPES[name])
