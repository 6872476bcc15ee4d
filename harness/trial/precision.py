"""Precision modes: autocast dtype, GradScaler and matmul precision, the same way on every device; and the SDPA
backend a deterministic CUDA trial relies on (trainer.deterministic=true)."""

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)


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


# --- the attention kernel under trainer.deterministic=true ---------------------------------------------------------
# Tried in this order on CUDA. PyTorch's randomness notes give flash and memory-efficient attention a deterministic
# backward in strict mode and exclude cuDNN attention; the math backend is plain matmuls (always deterministic).
DETERMINISTIC_SDPA = ("flash", "efficient", "math")
SDPA_SWITCHES = {
    "flash": "enable_flash_sdp",
    "efficient": "enable_mem_efficient_sdp",
    "math": "enable_math_sdp",
    "cudnn": "enable_cudnn_sdp",
}


def choose_sdpa_backend(device_type: str, deterministic: bool, runs: Callable[[str], bool]) -> str | None:
    """The SDPA backend a deterministic CUDA trial relies on: the first of DETERMINISTIC_SDPA that `runs` (a
    deterministic forward and backward at the trial's dtype and shapes, without error or warning). None: torch
    picks (not deterministic, or not CUDA, where every CPU kernel is deterministic)."""
    if not deterministic or device_type != "cuda":
        return None
    return next(name for name in DETERMINISTIC_SDPA if name == "math" or runs(name))


def sdpa_runs(device: torch.device, dtype: torch.dtype, model) -> Callable[[str], bool]:
    """Whether one backend alone runs SDPA forward and backward at the model's head size and dropout, under
    strict deterministic algorithms, with any warning (e.g. "defaults to a non-deterministic algorithm") an error."""

    def runs(name: str) -> bool:
        head = model.d_model // model.n_head
        q, k, v = (
            torch.randn(1, model.n_head, model.context_length, head, device=device, dtype=dtype, requires_grad=True)
            for _ in range(3)
        )
        backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}[name])
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("error")
                F.scaled_dot_product_attention(q, k, v, dropout_p=model.dropout, is_causal=True).sum().backward()
            torch.cuda.synchronize(device)
            return True
        except (RuntimeError, UserWarning):
            return False

    return runs


def select_sdpa_backend(device: torch.device, deterministic: bool, precision: str, model) -> str | None:
    """Choose (choose_sdpa_backend), switch every other CUDA SDPA backend off for the process, and log it."""
    if device.type != "cuda":
        return None
    if not deterministic:  # trials may share a process: undo an earlier deterministic trial's choice
        for switch in SDPA_SWITCHES.values():
            getattr(torch.backends.cuda, switch)(True)
        return None
    dtype = {"fp16_amp": torch.float16, "bf16_amp": torch.bfloat16}.get(precision, torch.float32)
    chosen = choose_sdpa_backend(device.type, deterministic, sdpa_runs(device, dtype, model))
    for name, switch in SDPA_SWITCHES.items():
        getattr(torch.backends.cuda, switch)(name == chosen)
    log.info("trainer.deterministic=true: attention runs on the %s SDPA backend only (cuDNN excluded)", chosen)
    return chosen
