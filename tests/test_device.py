import pytest
import torch

from ssl_blood.device import autocast, describe_device, resolve_device, uses_bf16
from ssl_blood.errors import UserError


def test_resolve_and_describe():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert describe_device("cpu").startswith("CPU (") and "threads" in describe_device("cpu")
    with pytest.raises(UserError, match="`device` tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA GPU"):
            resolve_device("cuda")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert uses_bf16(cpu, "bf16") and not uses_bf16(cpu, "fp32")
    assert autocast(cpu, "fp32").fast_dtype == torch.bfloat16 and not autocast(cpu, "fp32")._enabled
    with pytest.raises(UserError, match="`precision` fp16"):
        uses_bf16(cpu, "fp16")


def test_progress_off_a_terminal_is_plain_lines(capsys, monkeypatch):
    """In a pipe a long step prints plain lines (no carriage returns) with how far, the rate and
    the time left; on a terminal it is a tqdm bar; quiet (--json) prints nothing."""
    from ssl_blood import ui

    monkeypatch.setenv(ui.ENV_PROGRESS_EVERY, "0")
    for _ in ui.bar(range(3), desc="embedding", unit="batch"):
        pass
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == 3
    assert lines[-1].startswith("ssl-blood: embedding: 3/3 batch (100%)") and "batch/s" in lines[-1]
    progress = ui.bar(total=10, desc="pretraining", unit="step")
    progress.update(4)
    progress.set_postfix(epoch=1, loss="4.1")
    progress.update(1)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "5/10 step (50%)" in last and "min left" in last and last.endswith("epoch 1, loss 4.1")
    ui.set_quiet(True)
    try:
        for _ in ui.bar(range(3), desc="quiet"):
            pass
        assert capsys.readouterr().err == ""
    finally:
        ui.set_quiet(False)


def test_auto_precision_is_bf16_with_amx_or_where_measured_faster(monkeypatch):
    import torch

    from ssl_blood import device

    cpu = torch.device("cpu")

    def never_measure():
        raise AssertionError("a CPU without AVX-512 BF16 or with AMX needs no measurement")

    monkeypatch.setattr(device, "_bf16_speedup", never_measure)
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "fma"})  # no bf16 instructions
    assert not device.uses_bf16(cpu, "auto") and device.uses_bf16(cpu, "bf16")
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx512f", "amx_tile", "amx_bf16"})
    assert device.uses_bf16(cpu, "auto") and not device.uses_bf16(cpu, "fp32")
    # AVX-512 BF16 without AMX: measured (a Xeon where fp32 was faster, a Zen 4 where bf16 was)
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(device, "_bf16_speedup", lambda: 0.85)
    assert not device.uses_bf16(cpu, "auto")
    monkeypatch.setattr(device, "_bf16_speedup", lambda: 2.0)
    assert device.uses_bf16(cpu, "auto")


def test_the_bf16_measurement_times_both_precisions_once_per_process():
    import torch

    from ssl_blood import device

    device._bf16_speedup.cache_clear()
    with torch.inference_mode():  # the first caller may be embedding, gradients off
        ratio = device._bf16_speedup()
    assert 0 < ratio < 100 and device._bf16_speedup() == ratio  # cached: the same answer
    assert device._bf16_speedup.cache_info().hits >= 1
