"""Which device to run on, in which precision, and how to name it in results."""

from __future__ import annotations

import functools
import platform
import time

import torch

from ssl_blood.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" is the GPU when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"`device` {device} but this torch sees no CUDA GPU; use cpu", param="device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"`device` {device}: use auto, cpu or cuda", param="device") from None


def describe_device(device: torch.device | str = "auto") -> str:
    """A name for results files: the GPU's name, or the CPU with its thread count."""
    device = resolve_device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


BF16_MIN_SPEEDUP = 1.25  # bf16 is chosen where it measured at least this much faster than fp32


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 is the faster precision on this CPU. With AMX tiles (amx_bf16) it is (measured:
    3.2x fp32, 309 vs 95 img/s); without bf16 instructions it is not. With AVX-512 BF16 but no
    AMX the answer differs by CPU, so it is measured here (`_bf16_speedup`): on one such Xeon fp32
    was faster (102-112 vs 89-92 img/s), on an AMD Zen 4 bf16 ran 1.9x fp32 in training and 2.1x
    in inference (docs/benchmarks.md). Where /proc/cpuinfo cannot be read, oneDNN's answer
    stands."""
    flags = _cpu_flags()
    if not flags:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if "amx_bf16" in flags:
        return True
    return "avx512_bf16" in flags and _bf16_speedup() >= BF16_MIN_SPEEDUP


@functools.lru_cache(maxsize=1)
def _bf16_speedup() -> float:
    """fp32 time over bf16 time of a small conv stack's forward and backward (28-px batch of 32,
    channels_last, as the CPU backbones run), best of two interleaved tries after a warm-up:
    about 0.4 s, once per process."""
    # gradients on and ordinary tensors, whatever the caller's context (the first caller may be
    # embedding under no_grad or inference_mode)
    with torch.inference_mode(False), torch.enable_grad():
        return _time_bf16_against_fp32()


def _time_bf16_against_fp32() -> float:
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1),
                        nn.ReLU(), nn.Conv2d(128, 256, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1)).to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)

    def run(bf16: bool) -> float:
        started = time.perf_counter()
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = net(x).float().sum()
            loss.backward()
        return time.perf_counter() - started

    run(False), run(True)  # oneDNN builds its kernels on first use
    fp32, bf16 = zip(*[(run(False), run(True)) for _ in range(2)])  # interleaved: a busy machine slows both
    return min(fp32) / min(bf16)


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """"auto": bf16 on CUDA and on CPUs with fast bf16; "bf16" forces it, "fp32" turns it off."""
    if precision not in PRECISIONS:
        raise UserError(f"`precision` {precision}: use auto, bf16 or fp32", param="precision")
    return precision == "bf16" or (
        precision == "auto" and (device.type == "cuda" or cpu_has_fast_bf16()))


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context for `precision` (see `uses_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))
