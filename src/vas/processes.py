"""Child processes that serve: a free local port, a server command run while a ``with`` block runs (ready once a
URL answers), and llama-cpp-python's OpenAI-compatible server over a GGUF file (π0 behind an API for
:class:`vas.policy.api.ApiPolicy`; ``vas serve`` in the background is :func:`vas.serving.server.serve_in_background`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from vas.errors import VasError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def background_server(argv: list[str], ready_url: str, *, name: str, startup_timeout: float, log=None,
                      env: dict | None = None):
    """Run the server command ``argv`` as a child process while the ``with`` block runs: wait until a GET of
    ``ready_url`` succeeds, then yield; stop the server at the end (terminate, then kill after 30 s).

    Args:
        log: a file for the server's output (its last line explains a failed start); None: discarded, with
            the error output kept for that message.

    Raises:
        VasError: if the server exits or does not answer within ``startup_timeout`` seconds.
    """
    import subprocess
    import time
    import urllib.request

    process = subprocess.Popen(argv, stdout=log or subprocess.DEVNULL,
                               stderr=subprocess.STDOUT if log else subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    if log:
                        log.flush()
                        output = Path(log.name).read_bytes()
                    else:
                        output = process.stderr.read() or b""
                    error = output.decode(errors="replace").strip().splitlines()
                    raise VasError(f"{name} exited: {error[-1] if error else 'no message'}") from None
                if time.monotonic() > deadline:
                    raise VasError(f"{name} did not answer within {startup_timeout:g} s") from None
                time.sleep(0.5)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def llama_cpp_server(model_path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                     startup_timeout: float = 180.0):
    """Serve a GGUF model with llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (a free port) while
    the ``with`` block runs; yields the base URL (``http://127.0.0.1:PORT/v1``). Needs
    ``pip install 'llama-cpp-python[server]'``. Pass :data:`vas.policy.api.LLAMA_CPP_UNTRUNCATED` as
    ``extra_body`` so that its samplers draw from π0 itself. ``n_threads``: the server's CPU threads (None: its
    default, half the cores, leaving the rest to a local value model).

    Raises:
        VasError: if the server exits or does not answer within ``startup_timeout`` seconds.
    """
    import sys

    port = free_port()
    argv = ([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "false"]
            + (["--n_threads", str(n_threads)] if n_threads else []))
    url = f"http://127.0.0.1:{port}/v1"
    with background_server(argv, url + "/models", name="llama_cpp.server", startup_timeout=startup_timeout):
        yield url
