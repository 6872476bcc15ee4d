"""Precision modes: autocast dtype, GradScaler and matmul precision, the same way on every device."""

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    mode: str
    device: torch.device
    device_requested: bool = False  # trainer.device named explicitly (not `auto`)

    def __post_init__(self):
        if self.device.type == "cpu" and self.mode == "fp16_amp" and not self.device_requested:
            raise ValueError(
                "trainer.precision=fp16_amp but no CUDA device was found. On CPU use trainer.precision=tf32 or fp32 "
                "(same arithmetic there). fp16 autocast with GradScaler does run on a CPU, emulated and several times "
                "slower than fp32: ask for it explicitly with trainer.device=cpu."
            )
        torch.set_float32_matmul_precision("highest" if self.mode == "fp32" else "high")
        torch.backends.cuda.matmul.allow_tf32 = self.mode != "fp32"
        torch.backends.cudnn.allow_tf32 = self.mode != "fp32"

    @property
    def autocast_dtype(self):
        return {"fp16_amp": torch.float16, "bf16_amp": torch.bfloat16}.get(self.mode)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16; a disabled scaler passes steps straight to the optimizer."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "fp16_amp")
