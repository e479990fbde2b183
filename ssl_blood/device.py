"""Which device to run on, in which precision, and how to name it in results."""

from __future__ import annotations

import platform

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


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 is the faster precision on this CPU: only with AMX tiles (amx_bf16). Measured
    (docs/benchmarks.md, issue 25): with AMX bf16 ran 3.2x fp32 (309 vs 95 img/s); with AVX-512
    BF16 but no AMX fp32 was faster (102-112 vs 89-92 img/s), so oneDNN's "bf16 supported" is not
    the test. Where /proc/cpuinfo cannot be read, oneDNN's answer stands."""
    flags = _cpu_flags()
    if flags:
        return "amx_bf16" in flags
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """"auto": bf16 on CUDA and on CPUs with fast bf16; "bf16" forces it, "fp32" turns it off."""
    if precision not in PRECISIONS:
        raise UserError(f"`precision` {precision}: use auto, bf16 or fp32", param="precision")
    return precision == "bf16" or (
        precision == "auto" and (device.type == "cuda" or cpu_has_fast_bf16()))


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast context for `precision` (see `uses_bf16`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))
