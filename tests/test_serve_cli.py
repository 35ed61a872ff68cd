"""`vas serve`'s checks before vLLM starts: each bad option is one line and exit 2, and a machine without
vLLM is told what to install."""

import json
import os
import subprocess
import sys

import pytest

from vas.errors import VasError
from vas.serving import server


def vas(*args):
    return subprocess.run([sys.executable, "-m", "vas", *args], capture_output=True, text=True, timeout=120)


def test_without_vllm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VasError, match=r"pip install 'value-augmented-sampling\[serve-cpu\]'.*'value-augmented-sampling\[serve\]' on a GPU"):
        server.require_vllm()


@pytest.mark.parametrize("args, message", [
    (["--value", "nameless"], "NAME=DIR"),
    (["--value", "a b=/x"], "NAME=DIR"),
    (["--value", "a=/does/not/exist"], "does not exist"),
])
def test_bad_values_are_one_line(args, message):
    result = vas("serve", *args)
    if "vLLM is not installed" in result.stderr:
        pytest.skip("vLLM is not installed")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_repeated_names_a_wrong_tokenizer_and_k_are_refused(tiny_model_dir, other_tokenizer_model_dir, tmp_path,
                                                            monkeypatch):
    from helpers import random_value_model

    random_value_model(other_tokenizer_model_dir).save_pretrained(tmp_path / "other")
    with pytest.raises(VasError, match="twice"):
        server.parse_named([f"a={tmp_path / 'other'}", f"a={tmp_path / 'other'}"])
    config = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'other'}"]))
    monkeypatch.setattr(server, "require_vllm", lambda: None)
    with pytest.raises(VasError, match="different tokenizer"):
        config.command()
    random_value_model(tiny_model_dir).save_pretrained(tmp_path / "same")
    config = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'same'}"]), top_k=10_000)
    with pytest.raises(VasError, match="--top-k must be between 1 and 100"):
        config.command()
    config = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'same'}"]), top_k=0)
    with pytest.raises(VasError, match="--top-k must be an integer ≥ 1 or 'all', got 0"):
        config.command()
    for spec in ("=dir", "a=", " a=dir", "a =dir", "a b=dir"):
        with pytest.raises(VasError, match="--value must be NAME=DIR"):
            server.parse_named([spec])
    config = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'same'}"]), top_k="all")
    with pytest.raises(VasError, match="--top-k all needs value models with the next head; 'a' has the last head"):
        config.command()
    random_value_model(tiny_model_dir, head="next").save_pretrained(tmp_path / "ahead")
    for k in ("all", 200):  # a server of next heads only: any k up to the vocabulary
        _, env = server.ServeConfig(tiny_model_dir, server.parse_named([f"n={tmp_path / 'ahead'}"]), top_k=k).command()
        assert json.loads(env["VAS_VLLM_SETTINGS"])["top_k"] == k
    config = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'same'}"]),
                                vllm_args=["--speculative-config", '{"method": "ngram"}'])
    with pytest.raises(VasError, match="does not run with speculative decoding"):
        config.command()
    argv, env = server.ServeConfig(tiny_model_dir, server.parse_named([f"a={tmp_path / 'same'}"])).command()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"  # loopback by default
    assert str(tmp_path / "same") in env["VAS_VLLM_SETTINGS"]
    assert "VLLM_USE_V2_MODEL_RUNNER" not in env or env["VLLM_USE_V2_MODEL_RUNNER"] == os.environ.get(
        "VLLM_USE_V2_MODEL_RUNNER")  # the installed vLLM picks its runner


def test_a_port_in_use_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import socket

    from helpers import random_value_model

    random_value_model(tiny_model_dir).save_pretrained(tmp_path / "v")
    monkeypatch.setattr(server, "require_vllm", lambda: None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = server.ServeConfig(tiny_model_dir, server.parse_named([f"v={tmp_path / 'v'}"]), port=port)
        with pytest.raises(VasError, match=f"cannot listen on 127.0.0.1:{port}"):
            config.command()
