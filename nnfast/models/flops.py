"""The GPU peaks that MFU is measured against."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (datasheet, without sparsity) by device-name fragment; the
# first fragment found in the name wins, so the more specific ones come first.
_PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "A10G": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device (None on CPU or an unknown GPU)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16.items():
        if key in name:
            return value
    return None


class MFUMixin:
    """``estimate_mfu`` for any model with ``estimate_flops_per_token(seq_len)``."""

    def estimate_mfu(
        self, tokens_per_s: float, peak: float | None = None, seq_len: int | None = None
    ) -> float | None:
        """Model FLOPs utilization: achieved FLOP/s over ``peak`` (default: ``peak_flops()``
        of the current GPU); None when the peak is unknown (a CPU)."""
        peak = peak if peak is not None else peak_flops()
        if not peak:
            return None
        return tokens_per_s * self.estimate_flops_per_token(seq_len) / peak
