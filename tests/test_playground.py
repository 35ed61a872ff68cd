"""`vas playground`: its requests and messages, the value-model listing of `vas serve`, and the page itself in
a real browser (Debian's Chromium driven by Playwright) against a real `vas serve` with the embedded model and
two small value models."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from vas.config import EMBEDDED_MODEL
from vas.errors import VasError
from vas.processes import free_port
from vas.serving.playground import Answer, Server, _label, connect, steering, stream

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SERVER = Server("http://127.0.0.1:9", None, EMBEDDED_MODEL,
                [{"name": "kind", "head": "last"}, {"name": "short", "head": "mean"}], top_k=10, max_top_k=100)


def test_the_page_asks_for_its_sliders_steering():
    assert steering(SERVER, 4.0, 10.0, (1.0, -0.5)) == {"vas_beta": 4.0, "vas_top_k": 10, "vas_values": "kind=1,short=-0.5"}
    for bad in ((float("nan"), 10, (1, 1)), (4, None, (1, 1)), (4, 10, (1, float("inf")))):
        with pytest.raises(VasError, match="finite number"):
            steering(SERVER, *bad)


def test_a_slider_label_tells_what_the_value_model_is():
    assert _label({"name": "kind", "head": "distributional", "reward": "positivity", "train_rows": 900,
                   "val_rows": 100, "validation_r2": 0.374}) == \
        "weight of kind (distributional, reward positivity, 1000 responses, validation R² 37%)"
    assert _label({"name": "x", "head": None}) == "weight of x (last)"


def test_a_server_that_cannot_be_reached_or_is_not_openai_compatible_is_one_line():
    with pytest.raises(VasError, match=r"cannot reach a server at http://127.0.0.1:\d+.*is vas serve running there"):
        connect(f"http://127.0.0.1:{free_port()}", timeout=5)
    with plain_server({}) as url, pytest.raises(VasError, match=r"lists no model at /v1/models \(HTTP 404\)"):
        connect(url)


def test_a_server_without_value_models_answers_plainly_and_says_why():
    """An OpenAI-compatible server that is not vas serve: the page has no weight sliders and its steered
    column says why."""
    with plain_server({"/v1/models": {"data": [{"id": "some-model"}]}}) as url:
        server = connect(url)
    assert (server.model, server.value_models) == ("some-model", [])
    pytest.importorskip("gradio")
    from vas.serving.playground import build

    assert "this server serves no value models" in json.dumps(build(server).config)


class plain_server:
    """An HTTP server on 127.0.0.1 that answers GET ``path`` with ``routes[path]`` as JSON, else 404."""

    def __init__(self, routes: dict):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = routes.get(self.path)
                self.send_response(404 if body is None else 200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(body or {}).encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("args, message", [
    ([], "give --url of a running vas serve, or vas serve's options"),
    (["--url", "http://127.0.0.1:9", "--value", "a=/x"], "--url connects to a running server"),
    (["--url", "http://127.0.0.1:PORT"], "cannot reach a server at http://127.0.0.1:"),
    (["--port", "0", "--url", "http://127.0.0.1:9"], "--port must be between 1 and 65535"),
])
def test_bad_command_lines_are_one_line(args, message):
    import subprocess
    import sys

    args = [a.replace("PORT", str(free_port())) for a in args]
    result = subprocess.run([sys.executable, "-m", "vas", "playground", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_answer_from_a_server_that_went_away_is_an_error_not_a_hang():
    answer, changed = Answer(), asyncio.Event()
    server = Server(f"http://127.0.0.1:{free_port()}", None, EMBEDDED_MODEL)
    asyncio.run(stream(server, "hi", temperature=0.7, max_tokens=4, seed=0, xargs=None, answer=answer,
                       changed=changed, timeout=5))
    assert answer.done and answer.error.startswith(f"no answer from {server.url}")


# --- against a real vas serve ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("vllm")
    from helpers import random_value_model

    from vas.models import embedded_model_dir
    from vas.serving.server import serve_in_background

    folder = tmp_path_factory.mktemp("playground")
    for seed, (name, head) in enumerate({"kind": {}, "short": {"head": "mean"}}.items(), start=1):
        random_value_model(str(embedded_model_dir()), seed=seed, num_layers=2, **head).save_pretrained(
            folder / name, reward="positivity" if name == "kind" else None, train_rows=90, val_rows=10,
            metrics={"eval_explained": 0.25})
    with open(folder / "server.log", "w+") as log, serve_in_background(
            ["--dtype", "float32", "--value-dtype", "float32", "--value", f"kind={folder / 'kind'}",
             "--value", f"short={folder / 'short'}", "--api-key", "secret", "--max-model-len", "1024"], log=log) as url:
        yield url, folder


@pytest.mark.slow
def test_the_server_lists_its_value_models_without_paths_and_only_with_the_key(served):
    url, folder = served
    answer = httpx.get(f"{url}/v1/vas/value_models", headers={"Authorization": "Bearer secret"}, timeout=60)
    assert answer.status_code == 200
    assert answer.json() == {
        "value_models": [
            {"name": "kind", "head": "last", "reward": "positivity", "train_rows": 90, "val_rows": 10, "validation_r2": 0.25},
            {"name": "short", "head": "mean", "reward": None, "train_rows": 90, "val_rows": 10, "validation_r2": 0.25}],
        "top_k": 10, "max_top_k": 100, "vocab_size": 49152}
    assert str(folder) not in answer.text
    assert httpx.get(f"{url}/v1/vas/value_models", timeout=60).status_code == 401
    with pytest.raises(VasError, match="needs its API key"):
        connect(url)
    server = connect(url, "secret")
    assert (server.model, [m["name"] for m in server.value_models]) == (EMBEDDED_MODEL, ["kind", "short"])


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_in_a_browser_moves_only_the_steered_answer(served, tmp_path):
    """Load the page, answer once, move β and one weight, answer again: the plain answer stays, the steered one
    changes; β = 0 says the steered answer is π0; a prompt left empty gives a message on the page."""
    pytest.importorskip("gradio")
    playwright = pytest.importorskip("playwright.sync_api")
    from vas.serving.playground import launch

    url, _ = served
    port = free_port()
    page_app = launch(connect(url, "secret"), port=port, block=False)
    screenshot = Path(os.environ.get("VAS_PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}", timeout=60_000)

            def set_number(elem_id: str, value) -> None:
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
                slider = page.locator(f"#{elem_id} input[type=range]")
                if slider.count():  # the page has taken the value before anything is clicked
                    playwright.expect(slider).to_have_value(str(value), timeout=30_000)

            def answer() -> tuple[str, str, str, str]:
                page.locator("#answer").click()
                page.wait_for_function(  # the previous answers are gone
                    "() => ['plain-stats', 'steered-stats'].every(id => /generating|processing|⚠/.test("
                    "document.getElementById(id)?.innerText || ''))", timeout=60_000)
                page.wait_for_function(
                    "() => ['plain-stats', 'steered-stats'].every(id => { const t = document.getElementById(id)"
                    "?.innerText || ''; return (t.includes(' tokens · ') && !/generating|processing/.test(t)) || t.includes('⚠'); })",
                    timeout=240_000)
                return (page.locator("#plain textarea").input_value(), page.locator("#plain-stats").inner_text(),
                        page.locator("#steered textarea").input_value(), page.locator("#steered-stats").inner_text())

            page.locator("#prompt textarea").fill("Tell me about your favourite city.")
            set_number("max_tokens", 24)
            set_number("seed", 7)
            set_number("beta", 2)
            plain, plain_stats, steered, steered_stats = answer()
            assert plain and steered, (plain_stats, steered_stats)
            assert "24 tokens" in plain_stats and "KL to π0: 0" in plain_stats
            assert "steered, β = 2" in steered_stats and "not reported by the server" in steered_stats

            set_number("beta", 24)
            set_number("weight-short", -2)
            plain_again, _, steered_again, steered_stats = answer()
            assert plain_again == plain  # the same seed, no steering
            assert steered_again != steered, steered_stats
            assert "steered, β = 24" in steered_stats
            page.screenshot(path=str(screenshot), full_page=True)

            set_number("beta", 0)
            plain_again, _, steered_again, steered_stats = answer()
            assert "steered, β = 0 (β = 0 or every weight 0: this is π0)" in steered_stats
            assert steered_again == plain_again == plain
            page.locator("#prompt textarea").fill("  ")
            _, plain_stats, _, steered_stats = answer()
            assert "write a prompt first" in plain_stats and "write a prompt first" in steered_stats
            browser.close()
    finally:
        page_app.close()
    assert screenshot.stat().st_size > 10_000
