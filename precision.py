"""The precision policy in one place: the autocast dtype an amp / eval_amp setting gets on a device, and fp16's
GradScaler. "fp16" is CUDA only (the CPU has no fast fp16); "bf16" runs where native, elsewhere fp32 ("none").
"""

import warnings
from contextlib import nullcontext

import torch


def native_bf16(device):
    """Whether bf16 runs natively: an AMD GPU, an NVIDIA GPU of compute capability 8.0 or newer (older ones emulate
    bf16, though torch.cuda.is_bf16_supported() says yes), or a CPU with AVX512-BF16 or AMX (elsewhere oneDNN
    emulates bf16, several times slower than fp32)."""
    if device.type == "cuda":
        if torch.version.hip:
            return torch.cuda.is_bf16_supported()
        return torch.cuda.get_device_capability(device) >= (8, 0)
    cpu_checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private helpers: absent in some versions
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in cpu_checks)


def autocast_dtype(amp, device, warn=True):
    """The autocast dtype for amp ("none", "bf16", "fp16") on `device`; None (fp32) where the hardware lacks it,
    with a warning that says so unless warn=False."""
    if amp == "none":
        return None
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    if amp == "bf16" and native_bf16(device):
        return torch.bfloat16
    if warn:
        warnings.warn(f"eval_amp={amp}: {device} has no native {amp}; running fp32", stacklevel=2)
    return None


def training_precision(amp, device):
    """(autocast dtype or None, autocast context, GradScaler enabled for fp16 only); fp32 where the hardware lacks the
    dtype, without a warning: the caller says it (fp16, the default, is fp32 on a CPU)."""
    dtype = autocast_dtype(amp, device, warn=False)
    if dtype is None:
        return None, nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return dtype, torch.autocast(device.type, dtype=dtype), scaler


def use_channels_last(setting, device, dtype):
    """Whether training runs in channels_last memory format: "true" / "false" as given; "auto" on CUDA under fp16 or
    bf16 autocast (`dtype`), where NHWC is the tensor cores' native layout (PyTorch's performance guide)."""
    return device.type == "cuda" and dtype is not None if setting == "auto" else setting == "true"


