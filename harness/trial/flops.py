"""Model FLOPs utilisation: the peak FLOP/s of the devices the harness knows, and `mfu`, the fraction of that peak
a trial's matmuls use. The trainer logs it per period; `harness/study/cost.py` budgets studies with the same table."""

# Dense fp16/bf16 tensor-core peak FLOP/s of one device, by substring of the CUDA device name (the MFU denominator).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: the model's matmul FLOP/s (`GPTModel.flops_per_token`) over the peak of all
    the devices that produced `tokens_per_sec` together."""
    return tokens_per_sec * flops_per_token / (peak_flops_per_device * devices)


def peak_flops(device_name: str) -> float | None:
    """The peak FLOP/s of the CUDA device named `device_name` (matched by substring), None if the table lacks it."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
