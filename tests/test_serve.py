"""`vas serve` for real on 127.0.0.1: vLLM with the embedded model and two small value models, against the
project's own decoding loop, under concurrent mixed requests, through the official openai client, and with
bad input. Both sides run float32."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("vllm")

from vas.config import EMBEDDED_MODEL  # noqa: E402
from vas.decoding.loop import Steering, sample  # noqa: E402
from vas.prompts import encode_prompts  # noqa: E402
from vas.serving.server import serve_in_background  # noqa: E402
from vas.value.model import ValueModel  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["hi", "Tell me about cats.", "Write a short poem about the sea, the wind and the stars at night, please."]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def values(embedded_value_dir):
    """Four value models on the embedded model's first 2 layers with random LoRA and heads: the last-token,
    mean, distributional and next-token heads."""
    return {name: embedded_value_dir(name) for name in ("kind", "short", "odds", "ahead")}


@pytest.fixture(scope="module")
def server(values, tmp_path_factory):
    with open(tmp_path_factory.mktemp("serve") / "server.log", "w+") as log, serve_in_background(
            ["--dtype", "float32", "--value-dtype", "float32", "--value", f"kind={values['kind']}",
             "--value", f"short={values['short']}", "--value", f"odds={values['odds']}", "--value",
             f"ahead={values['ahead']}", "--api-key", "secret", "--max-model-len", "1024"], log=log) as url:
        yield url


@pytest.fixture(scope="module")
def local(embedded_local, values):
    """The project's own decoding loop on the same model and value models, float32."""
    models = {name: ValueModel.from_pretrained(path) for name, path in values.items()}
    return embedded_local, models


HEADERS = {"Authorization": "Bearer secret"}


def complete(url: str, prompt_ids: list[int], xargs: dict | None = None, **body) -> dict:
    """One greedy completion of π0's token ids; returns the response's token ids and text."""
    payload = {"model": EMBEDDED_MODEL, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0,
               "return_token_ids": True, **body}
    if xargs is not None:
        payload["vllm_xargs"] = xargs
    answer = httpx.post(f"{url}/v1/completions", json=payload, headers=HEADERS, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]


def own_greedy(local, prompt: str, beta: float = 0.0, weights: dict | None = None, top_k: int | str = 10,
               soft: bool = False) -> list[int]:
    """Greedy argmax(log π0 + β Σ w V) at τ = 1 (Sec. 4.4) from the project's own loop."""
    policy, models = local
    weights = weights or {}
    steering = (Steering([models[n] for n in weights], list(weights.values()), beta=beta, top_k=top_k, soft=soft)
                if weights else None)
    return sample(policy, [prompt], steering, greedy=True, temperature=1.0, max_new_tokens=MAX_TOKENS).token_ids[0]


def ids_of(tokenizer, prompt: str) -> list[int]:
    return encode_prompts(tokenizer, [prompt])[0]


def test_plain_and_beta_zero_requests_are_plain_pi0(server, local, embedded_tokenizer):
    for prompt in PROMPTS:
        want = own_greedy(local, prompt)
        assert complete(server, ids_of(embedded_tokenizer, prompt))["token_ids"] == want
        beta_zero = complete(server, ids_of(embedded_tokenizer, prompt), {"vas_beta": 0, "vas_values": "kind=1"})
        assert beta_zero["token_ids"] == want


def test_steered_greedy_equals_the_projects_own_loop(server, local, embedded_tokenizer):
    settings = [(3.0, {"kind": 1.0, "short": -0.5}, 10), (-4.0, {"short": 1.0}, 5), (6.0, {"kind": 1.0}, 20)]
    for prompt, (beta, weights, k) in zip(PROMPTS, settings):
        want = own_greedy(local, prompt, beta, weights, k)
        assert want != own_greedy(local, prompt)  # the steering changes the answer
        xargs = {"vas_beta": beta, "vas_top_k": k, "vas_values": ",".join(f"{n}={w}" for n, w in weights.items())}
        assert complete(server, ids_of(embedded_tokenizer, prompt), xargs)["token_ids"] == want


def test_soft_and_mixed_heads_equal_the_projects_own_loop(server, local, embedded_tokenizer):
    """The mean head's window starts at each request's prompt, and soft values are taken at the request's β."""
    for prompt, (beta, weights, soft) in zip(PROMPTS, [(8.0, {"odds": 1.0}, True), (3.0, {"short": 1.0, "odds": -0.5}, True),
                                                       (5.0, {"short": 1.0}, False)]):
        want = own_greedy(local, prompt, beta, weights, soft=soft)
        xargs = {"vas_beta": beta, "vas_soft": soft, "vas_values": ",".join(f"{n}={w}" for n, w in weights.items())}
        assert complete(server, ids_of(embedded_tokenizer, prompt), xargs)["token_ids"] == want


def test_the_next_head_and_every_token_equal_the_projects_own_loop(server, local, embedded_tokenizer):
    """A next-token value model alone, over the whole vocabulary (vas_top_k "all"), and beside a last-token one."""
    for prompt, (beta, weights, k) in zip(PROMPTS, [(4.0, {"ahead": 1.0}, 10), (3.0, {"ahead": 1.0}, "all"),
                                                     (5.0, {"ahead": 1.0, "kind": 0.5}, 7)]):
        want = own_greedy(local, prompt, beta, weights, k)
        assert want != own_greedy(local, prompt)  # the steering changes the answer
        xargs = {"vas_beta": beta, "vas_top_k": k, "vas_values": ",".join(f"{n}={w}" for n, w in weights.items())}
        assert complete(server, ids_of(embedded_tokenizer, prompt), xargs)["token_ids"] == want


KINDS = [  # (prompt, vllm_xargs): plain, β = 0, and steered with different β, k and mixes of the two value models
    (0, None), (1, {"vas_beta": 0}), (2, {"vas_beta": 2.0}), (0, {"vas_beta": 3.0, "vas_values": "kind=1,short=-1"}),
    (1, {"vas_beta": -3.0, "vas_values": "short", "vas_top_k": 4}), (2, {"vas_beta": 5.0, "vas_values": "kind=0.5"}),
    (1, {"vas_beta": 4.0, "vas_values": "kind=1,short=1", "vas_top_k": 16}), (0, {"vas_beta": -2.0}),
]


def test_64_concurrent_mixed_requests_each_equal_the_same_request_alone(server, embedded_tokenizer, capsys):
    alone = [complete(server, ids_of(embedded_tokenizer, PROMPTS[p]), xargs)["token_ids"] for p, xargs in KINDS]
    assert len({tuple(a) for a in alone}) == len(KINDS)  # every kind answers differently: a mix-up would show
    requests = [KINDS[i % len(KINDS)] for i in range(64)]

    async def run():
        async with httpx.AsyncClient(timeout=600, headers=HEADERS) as client:
            async def one(p, xargs):
                payload = {"model": EMBEDDED_MODEL, "prompt": ids_of(embedded_tokenizer, PROMPTS[p]), "max_tokens": MAX_TOKENS,
                           "temperature": 0, "return_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})}
                answer = await client.post(f"{server}/v1/completions", json=payload)
                assert answer.status_code == 200, answer.text
                return answer.json()["choices"][0]["token_ids"]
            return await asyncio.gather(*(one(p, x) for p, x in requests))

    start = time.perf_counter()
    answers = asyncio.run(run())
    seconds = time.perf_counter() - start
    for i, answer in enumerate(answers):
        assert answer == alone[i % len(KINDS)], f"request {i} ({requests[i]})"
    with capsys.disabled():
        print(f"\n64 concurrent requests: {64 / seconds:.2f} requests/s, "
              f"{sum(map(len, answers)) / seconds:.1f} tokens/s")


def test_the_openai_client_streamed_and_not(server, local, embedded_tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="secret")
    xargs = {"vas_beta": 3.0, "vas_values": "kind=1,short=-0.5", "vas_top_k": 10}
    messages = [{"role": "user", "content": PROMPTS[1]}]
    answer = client.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"vllm_xargs": xargs})
    text = answer.choices[0].message.content
    want = own_greedy(local, PROMPTS[1], 3.0, {"kind": 1.0, "short": -0.5}, 10)
    assert text == embedded_tokenizer.decode(want, skip_special_tokens=True)
    stream = client.chat.completions.create(model=EMBEDDED_MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"vllm_xargs": xargs}, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == text
    plain = client.completions.create(model=EMBEDDED_MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    steered = client.completions.create(model=EMBEDDED_MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                        extra_body={"vllm_xargs": xargs})
    assert plain.choices[0].text != steered.choices[0].text


@pytest.mark.parametrize("xargs, field", [
    ({"vas_beta": 1, "vas_values": "nobody=1"}, "nobody"),
    ({"vas_beta": "abc"}, "vas_beta"),
    ({"vas_beta": "inf"}, "vas_beta"),
    ({"vas_beta": 1, "vas_values": "kind=nan"}, "kind"),
    ({"vas_beta": 1, "vas_top_k": 0}, "vas_top_k"),
    ({"vas_beta": 1, "vas_top_k": 49153}, "vas_top_k"),
    ({"vas_beta": 1, "vas_top_k": 101}, "--max-top-k"),
    ({"vas_beta": 1, "vas_top_k": "all", "vas_values": "kind,ahead"}, "vas_top_k"),
    ({"vas_beta": 1e300}, "vas_beta"),
    ({"vas_beta": 1, "vas_top_k": "../../etc/passwd"}, "vas_top_k"),
])
def test_bad_input_gets_400_naming_the_field_and_the_server_keeps_serving(server, embedded_tokenizer, xargs, field):
    payload = {"model": EMBEDDED_MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": xargs}
    answer = httpx.post(f"{server}/v1/completions", json=payload, headers=HEADERS, timeout=60)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["error"]["message"]
    assert complete(server, ids_of(embedded_tokenizer, "hi"), {"vas_beta": 1.0})["token_ids"]


@pytest.mark.parametrize("body, field", [
    ({"stream": True, "vllm_xargs": {"vas_top_k": 0, "vas_beta": 1}}, "vas_top_k"),
    ({"vas_beta": 3}, "inside vllm_xargs"),
    ({"vllm_xargs": {"vas_beta": True}}, "vas_beta"),
])
def test_streamed_and_misplaced_steering_gets_400_before_any_response(server, body, field):
    payload = {"model": EMBEDDED_MODEL, "prompt": "hi", "max_tokens": 2, **body}
    answer = httpx.post(f"{server}/v1/completions", json=payload, headers=HEADERS, timeout=60)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["error"]["message"]
    unauthorized = httpx.post(f"{server}/v1/completions", json=payload, timeout=60)
    assert unauthorized.status_code == 401  # the names of the value models are not told without the key


def test_the_api_key_is_required(server):
    answer = httpx.post(f"{server}/v1/completions", json={"model": EMBEDDED_MODEL, "prompt": "hi", "max_tokens": 1}, timeout=60)
    assert answer.status_code == 401
    for path in ("/metrics", "/version", "/tokenize"):  # vLLM guards only /v1: the processor's middleware the rest
        assert httpx.get(f"{server}{path}", timeout=60).status_code == 401, path
    assert httpx.get(f"{server}/metrics", headers=HEADERS, timeout=60).status_code == 200
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200  # liveness probes stay open


@pytest.mark.parametrize("xargs", [{"vas_beta": 1, "vas_values": "x" * 100_000},
                                   {"vas_beta": "9" * 100_000}, {"vas_" + "y" * 100_000: 1}])
def test_an_error_does_not_echo_a_huge_value(server, xargs):
    payload = {"model": EMBEDDED_MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": xargs}
    answer = httpx.post(f"{server}/v1/completions", json=payload, headers=HEADERS, timeout=60)
    assert answer.status_code == 400
    assert len(answer.content) < 1000 and "…" in answer.json()["error"]["message"]
