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
