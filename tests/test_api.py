"""The text-level path (Sec. 4.4): an OpenAI-compatible base policy (against a fault-injecting stub server),
value models with their own tokenizer, concurrent steering that resumes, and collection through the API."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from helpers import random_value_model
from stub_openai import DISTRIBUTION, RESPONSE, StubServer

from vas.policy.api import ApiPolicy, ApiRollout, Endpoint
from vas.decoding.loop import Steering, sample
from vas.errors import VasError
from vas.decoding.batches import generate
from vas.models import load_policy, load_tokenizer
from vas.policy.local import LocalPolicy, visible_text
from vas.prompts import encode_prompts
from vas.value.scorers import TextCandidateScorer


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.stop()


def policy_for(stub, **kwargs) -> ApiPolicy:
    return ApiPolicy(Endpoint(stub.url, "stub", **{"timeout": 5.0, "max_retries": 2, **kwargs}))


def next_token(policy, k, text=""):
    async def run():
        try:
            return await policy.next_token("hi", text, k)
        finally:
            await policy.close()
    return asyncio.run(run())


@pytest.mark.parametrize("chat", [False, True])
def test_next_token_top_k_with_the_end_token_as_none(stub, chat):
    pairs = next_token(policy_for(stub, chat=chat), 5, text="so far")
    expected = sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[:5]
    assert [c for c, _ in pairs] == [t or None for t, _ in expected]
    assert [lp for _, lp in pairs] == pytest.approx([math.log(p) for _, p in expected])
    path, body = stub.requests[0]
    assert body["max_tokens"] == 1 and body["temperature"] == 1.0
    if chat:  # the partial answer is continued, not closed
        assert path.endswith("/chat/completions") and body["continue_final_message"] is True
        assert body["messages"][-1] == {"role": "assistant", "content": "so far"}
    else:
        assert body["prompt"] == "hiso far" and body["logprobs"] == 5


def test_retries_on_429_500_and_timeouts(stub, monkeypatch):
    monkeypatch.setattr("stub_openai.SLOW", 1.0)
    stub.faults = ["429", "500", "timeout"]
    policy = policy_for(stub, timeout=0.5, max_retries=3)
    assert next_token(policy, 2)[0][0] == " good"
    assert len(stub.requests) == 4


def test_errors_are_one_clear_line(stub):
    stub.faults = ["500"] * 3
    with pytest.raises(VasError, match=r"answered HTTP 500: injected 500$"):
        next_token(policy_for(stub, max_retries=2), 2)
    stub.faults = ["no_logprobs"] + [None, "no_logprobs"] * 4  # a server without log-probabilities
    with pytest.raises(VasError, match="returned no log-probabilities"):
        next_token(policy_for(stub), 2)
    stub.faults = ["few_logprobs"] + [None, "few_logprobs"] * 4  # a server that caps top_logprobs at 3
    with pytest.raises(VasError, match=r"returned 3 log-probabilities where --top-k 5 were asked: use --top-k 3"):
        next_token(policy_for(stub), 5)
    with pytest.raises(VasError, match="cannot reach http://127.0.0.1:9/v1"):
        next_token(ApiPolicy(Endpoint("http://127.0.0.1:9/v1", "x", max_retries=0)), 2)
    with pytest.raises(VasError, match="must start with http:// or https://"):
        ApiPolicy(Endpoint("127.0.0.1:9/v1", "x"))


def test_a_run_that_fails_before_any_row_leaves_nothing(stub, tmp_path):
    stub.faults = ["500"]
    with pytest.raises(VasError, match="HTTP 500") as caught:
        generate(policy_for(stub, max_retries=0), ["one"], Steering(top_k=2), tmp_path / "x.jsonl", batch_size=1,
                 progress=False)
    assert "kept" not in str(caught.value) and not (tmp_path / "x.jsonl.partial").exists()


def test_one_answer_without_or_with_too_few_log_probabilities_is_asked_again(stub):
    """llama.cpp's server answers a prompt its cache holds whole without log-probabilities; a completions answer
    (a dict keyed by text) loses tokens whose text repeats. Both are asked again, for more, after another prompt."""
    stub.faults = ["no_logprobs"]
    assert next_token(policy_for(stub), 2, text="x")[0][0] == " good"
    assert [(body["prompt"], body.get("logprobs")) for _, body in stub.requests] == [("hix", 2), ("\n", None), ("hix", 4)]
    stub.requests.clear()
    stub.faults = ["few_logprobs"]
    assert len(next_token(policy_for(stub), 5)) == 5
    assert [body.get("logprobs") for _, body in stub.requests] == [5, None, 7]
    stub.faults = ["sampled_end", None, "sampled_end"]
    assert len(next_token(policy_for(stub), 5)) == 5  # a later draw was not the end
    stub.faults = ["sampled_end"] + [None, "sampled_end"] * 4
    assert next_token(policy_for(stub), 5) == [(None, 0.0)]  # the end, every time


def full_forward_value(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1])


def test_text_scorer_equals_a_full_forward_while_the_tokenization_of_the_end_changes(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = random_value_model(tiny_model_dir)
    prompt_ids = encode_prompts(tokenizer, ["hello"])[0]
    scorer = TextCandidateScorer(model, tokenizer, prompt_ids)
    # " hel" is Ġh e l, " hello" is Ġh e llo: the cached "l" must be cropped, not reused.
    steps = [("", [" hel", " hap", None]), (" hel", ["p", "!", None]), (" hello", [" day", "!", None]),
             (" hello day", ["?", " i", None])]
    tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tokens(" hello")[:2] == tokens(" hel")[:2] and tokens(" hello")[2] != tokens(" hel")[2]
    for text, candidates in steps:
        got = scorer.score(text, [None if c is None else text + c for c in candidates])
        for value, c in zip(got.tolist(), candidates):
            ids = prompt_ids + tokens(text + (c or "")) + ([tokenizer.eos_token_id] if c is None else [])
            assert value == pytest.approx(full_forward_value(model, ids), abs=1e-5)
        if text == " hel":
            assert scorer.cached_ids == prompt_ids + tokens(" hel")
    assert scorer.cached_ids == prompt_ids + tokens(" hello day")


class FixedPolicy:
    """The stub's distribution, without a server."""

    def start(self, prompts, max_new_tokens):
        return ApiRollout(self, prompts)

    async def next_token(self, prompt, text, top_k):
        return [(t or None, math.log(p)) for t, p in sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[:top_k]]


def test_an_api_policy_is_steered_by_eq5_over_its_top_k(tiny_model_dir):
    """Greedy steps against π by hand: log p / τ + β·(V − V̄) over the k candidates, V by full forwards."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = random_value_model(tiny_model_dir, seed=3)
    prompt_ids = encode_prompts(tokenizer, ["hi"])[0]
    beta, tau, k = 4.0, 0.7, 4
    text, kl = "", 0.0
    top = sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[:k]
    for _ in range(3):
        values = torch.tensor([full_forward_value(model, prompt_ids + tokenizer(text + t, add_special_tokens=False)["input_ids"])
                               for t, _ in top])
        base = torch.log_softmax(torch.tensor([math.log(p) for _, p in top]) / tau, 0)
        steered = torch.log_softmax(base + beta * (values - values.mean()), 0)
        kl += float((steered.exp() * (steered - base)).sum())
        text += top[int(steered.argmax())][0]
    result = sample(FixedPolicy(), ["hi"], Steering([model], beta=beta, top_k=k), temperature=tau, max_new_tokens=3,
                    greedy=True)
    assert result.texts == [text] and result.steps.tolist() == [3] and not bool(result.finished[0])
    assert float(result.kl[0]) == pytest.approx(kl, rel=1e-4)
    assert float(result.outside_mass[0]) == pytest.approx(1 - sum(p for _, p in top), rel=1e-5)


def test_plain_top_k_sampling_follows_pi0_restricted_to_the_top_k():
    """β = 0 and no value model: first tokens over many seeds match p / Σ_top-k p at τ = 1."""
    k, n = 3, 3000
    top = sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[:k]
    counts = {t: 0 for t, _ in top}
    result = sample(FixedPolicy(), ["hi"] * n, Steering(top_k=k), temperature=1.0, max_new_tokens=1,
                    generator=torch.Generator().manual_seed(0))
    for text in result.texts:
        counts[text] += 1
    total = sum(p for _, p in top)
    for t, p in top:
        assert counts[t] / n == pytest.approx(p / total, abs=0.03)


def test_generate_keeps_finished_rows_and_resumes_to_the_same_result(stub, tiny_model_dir, tmp_path):
    steering = Steering([random_value_model(tiny_model_dir)], beta=2.0, top_k=4)
    prompts = ["one", "two", "three", "four"]
    run = dict(temperature=0.7, max_new_tokens=3, seed=5, batch_size=1, progress=False)
    whole = generate(policy_for(stub), prompts, steering, tmp_path / "whole.jsonl", concurrency=3, **run)
    requests = len(stub.requests)
    stub.faults = [None] * (requests - 1) + ["500"]  # the last request fails (no retries)
    with pytest.raises(VasError, match=r"HTTP 500.*; 3 of 4 finished responses are kept in .*cut.jsonl.partial: run the"):
        generate(policy_for(stub, max_retries=0), prompts, steering, tmp_path / "cut.jsonl", concurrency=1, **run)
    partial = (tmp_path / "cut.jsonl.partial").read_text().splitlines()
    assert len(partial) == 1 + 3 and not (tmp_path / "cut.jsonl").exists()
    with pytest.raises(VasError, match="other settings"):
        generate(policy_for(stub), prompts, steering, tmp_path / "cut.jsonl", concurrency=1, **{**run, "seed": 6})
    resumed = generate(policy_for(stub), prompts, steering, tmp_path / "cut.jsonl", concurrency=1, **run)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in whole]
    assert [json.loads(line)["prompt"] for line in (tmp_path / "cut.jsonl").read_text().splitlines()] == prompts


def test_collect_through_an_api_tokenizes_for_the_value_model(stub, tiny_model_dir, tmp_path):
    from vas.collect import collect
    from vas.config import CollectConfig
    from vas.rewards import load_reward

    tokenizer = load_tokenizer(tiny_model_dir)
    data = collect(policy_for(stub), ["a", "b"], load_reward("verbosity"), tmp_path / "data",
                   CollectConfig(samples_per_prompt=2, max_new_tokens=8, seed=3), value_tokenizer=tokenizer, progress=False)
    assert len(data) == 4 and data["response"] == [RESPONSE] * 4 and data["prompt_index"] == [0, 0, 1, 1]
    assert data["response_ids"][0] == tokenizer(RESPONSE, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert data["prompt_ids"][2] == encode_prompts(tokenizer, ["b"])[0]
    assert data["reward"] == pytest.approx([len(RESPONSE.split()) / 100] * 4)
    seeds = sorted(body["seed"] for _, body in stub.requests)
    assert len(set(seeds)) == 4 and all(body["temperature"] == 0.7 for _, body in stub.requests)


def test_a_local_policy_steered_by_a_value_model_of_another_tokenizer_is_eq5(tiny_model_dir, other_tokenizer_model_dir):
    """Greedy steps by hand: the full vocabulary's log π0 / τ, the top-k candidates' values read as text by the
    value model's own tokenizer (full forwards), β·(V − V̄) added to the top-k only (Eq. 5)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_policy(tiny_model_dir)
    value = random_value_model(other_tokenizer_model_dir, seed=5)
    assert value.tokenizer.get_vocab() != tokenizer.get_vocab()
    eos = tokenizer.eos_token_id
    beta, tau, k = 3.0, 0.7, 5
    prompt_ids = encode_prompts(tokenizer, ["hello"])[0]
    value_prompt = encode_prompts(value.tokenizer, ["hello"])[0]
    value_ids = lambda text: value.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, kl = [], 0.0
    for _ in range(4):
        with torch.no_grad():
            base = torch.log_softmax(model(torch.tensor([prompt_ids + ids])).logits[0, -1] / tau, -1)
        candidates = base.topk(k).indices.tolist()
        values = torch.tensor([full_forward_value(value, value_prompt + (
            value_ids(visible_text(tokenizer, ids)) + [value.tokenizer.eos_token_id] if c == eos
            else value_ids(visible_text(tokenizer, ids + [c])))) for c in candidates])
        steered = base.clone()
        steered[candidates] += beta * (values - values.mean())
        steered = torch.log_softmax(steered, -1)
        kl += float((steered.exp() * (steered - base)).sum())
        ids.append(int(steered.argmax()))
        if ids[-1] == eos:
            break
    result = sample(LocalPolicy(model, tokenizer, eos_token_ids=[eos]), ["hello"], Steering([value], beta=beta, top_k=k),
                    temperature=tau, max_new_tokens=4, greedy=True)
    assert result.token_ids == [ids]
    assert float(result.kl[0]) == pytest.approx(kl, rel=1e-4)


def test_row_log_drops_a_torn_line_and_restarts_a_partial_without_rows(tmp_path):
    from vas.resume import RowLog

    out = tmp_path / "rows.jsonl"
    log = RowLog(out, {"a": 1})
    log.append({"prompt_index": 1, "text": "é"})
    with open(tmp_path / "rows.jsonl.partial", "a") as f:
        f.write('{"prompt_index": 0, "te')  # a crash in the middle of a write
    again = RowLog(out, {"a": 1})
    assert list(again.rows) == [1] and again.rows[1]["text"] == "é"
    with pytest.raises(VasError, match=r"other settings \(--a\)"):
        RowLog(out, {"a": 2})
    again.append({"prompt_index": 0, "text": "x"})
    assert [r["prompt_index"] for r in again.finish()] == [0, 1] and not (tmp_path / "rows.jsonl.partial").exists()
    assert [json.loads(line)["prompt_index"] for line in out.read_text().splitlines()] == [0, 1]
    RowLog(tmp_path / "fresh.jsonl", {"a": 1})  # a start that failed before any row …
    assert RowLog(tmp_path / "fresh.jsonl", {"a": 2}).rows == {}  # … does not pin its settings


def test_stop_strings_end_the_response_across_token_boundaries():
    policy = ApiPolicy(Endpoint("http://127.0.0.1:9/v1", "x", stop=("<|im_end|>",)))
    assert policy.candidate("", "any") is None
    assert policy.candidate("<|im_end|>", "done") is None
    assert policy.candidate("end|>", "done <|im_") is None  # completes the stop string
    assert policy.candidate(" more", "done <|im_end|> and") == " more"  # an earlier stop string is not this token's
    assert policy.candidate(" fine", "done") == " fine"


def test_evaluate_through_an_api(stub, tiny_model_dir, tmp_path):
    """`vas evaluate`'s API path: plain samples are π0 restricted to its top-k, VAS moves away from it."""
    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate

    def length_reward(prompts, responses):
        return torch.tensor([len(r) / 10 for r in responses])

    report = evaluate(policy_for(stub), ["a", "b"], length_reward, [random_value_model(tiny_model_dir)], tmp_path / "e",
                      EvaluateConfig(betas=(4.0,), top_k=4, best_of=(1, 2), max_new_tokens=3, batch_size=1),
                      concurrency=2, progress=False)
    top = {t for t, _ in sorted(DISTRIBUTION.items(), key=lambda kv: -kv[1])[:4]}
    rows = [json.loads(line) for line in (tmp_path / "e" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 + 2 and report["plain"]["kl"] == 0 and report["vas"][0]["kl"] > 0
    for r in rows:  # each response is made of the top-4 tokens' texts (the end token is "")
        text, pieces = r["response"], sorted((t for t in top if t), key=len, reverse=True)
        while text:
            text = text[len(next(p for p in pieces if text.startswith(p))):]
    assert all(body["logprobs"] == 4 for _, body in stub.requests)
