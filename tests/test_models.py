"""Device and dtype choices: the value models' dtype follows what the hardware runs natively."""

from pathlib import Path

import pytest
import torch

from vas.errors import VasError
from vas.models import native_bf16, resolve_value_dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the Linux CPU flags")
def test_native_bf16_on_cpu_matches_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_value_dtype_auto_and_named():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native_bf16(cpu) else torch.float32
    assert resolve_value_dtype("auto", cpu) == expected
    assert resolve_value_dtype("float32", cpu) == torch.float32
    assert resolve_value_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(VasError, match="unknown dtype 'int8'"):
        resolve_value_dtype("int8", cpu)
