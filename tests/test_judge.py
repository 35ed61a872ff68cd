"""Judges: win rates by hand and by brute force, the App. E.2 verdict parser, and the LLM judge against a
stub OpenAI-compatible server."""

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from vas.errors import VasError
from vas.judge import (
    LLMJudge,
    best_of_n_win_rate,
    llm_win_rates,
    parse_verdict,
    win_rate_against_pool,
)


def test_win_rate_against_pool_by_hand():
    # x = 1.0 beats 0 and 0.5, ties 1.0 → 2.5/3; x = 0.5 beats 0, ties 0.5, loses to 1 → 1.5/3
    got = win_rate_against_pool(torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0, 0.5, 1.0]]))
    assert got.tolist() == pytest.approx([(2.5 + 1.5) / 6])


@pytest.mark.parametrize("N", [1, 2, 3, 4])
def test_best_of_n_win_rate_equals_brute_force(N):
    torch.manual_seed(N)
    rewards = torch.randperm(5).float()[None]  # distinct rewards decide the best of N
    judge = torch.tensor([[0.3, 0.0, 0.3, 0.9, -0.2]])  # ties included
    expected = []  # every N-subset, its best member against every pool sample outside the subset
    for subset in itertools.combinations(range(5), N):
        best = max(subset, key=lambda i: float(rewards[0, i]))
        for j in set(range(5)) - set(subset):
            expected.append(1.0 if judge[0, best] > judge[0, j] else 0.5 if judge[0, best] == judge[0, j] else 0.0)
    got = best_of_n_win_rate(rewards, judge, N)
    assert float(got[0]) == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    if N == 1:  # a plain sample against other plain samples
        assert float(got[0]) == pytest.approx(0.5, abs=1e-6)


def test_best_of_n_win_rate_with_the_reward_as_judge():
    # judge = reward (continuous): the best of N beats an independent sample with probability N / (N + 1)
    torch.manual_seed(0)
    rewards = torch.rand(400, 12)
    for N in (1, 3, 8):
        assert float(best_of_n_win_rate(rewards, rewards, N).mean()) == pytest.approx(N / (N + 1), abs=1e-6)
    with pytest.raises(ValueError, match="N < n"):
        best_of_n_win_rate(rewards, rewards, 12)


def test_parse_verdict():
    assert parse_verdict("Output (a)") == "a" and parse_verdict("output (B).") == "b"
    assert parse_verdict("Output(b)") == "b" and parse_verdict("Output (b), output about tone") == "b"
    assert parse_verdict("I cannot decide") is None and parse_verdict("Output (a) or Output (b)") is None


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that prefers the longer output, or fails with ``status``."""

    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.status != 200:
            self.send_response(self.status)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        a = text.split("### Output (a) for example 1:\n")[1].split("\n### Output (b)")[0]
        b = text.split("### Output (b) for example 1:\n")[1].split("\n## Preferred")[0]
        answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "Output (a)" if len(a) > len(b) else "Output (b)"}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    StubJudge.status = 200


def rows():
    """3 prompts, a pool of 3 plain samples each, one VAS sample per prompt at β = 2."""
    out = []
    plain = [["mid", "a", "longest one"], ["short", "xx", "y"], ["tiny", "medium!!", "z"]]
    rewards = [[0.1, 0.9, 0.5], [0.2, 0.1, 0.3], [0.0, 0.8, 0.1]]
    for p in range(3):
        for s in range(3):
            out.append({"method": "plain", "beta": 0.0, "prompt_index": p, "sample": s, "prompt": f"q{p}",
                        "response": plain[p][s], "reward": rewards[p][s]})
    for p, text in enumerate(["much longer text", "no", "longer than tiny"]):
        out.append({"method": "vas", "beta": 2.0, "prompt_index": p, "sample": 0, "prompt": f"q{p}", "response": text,
                    "reward": 0.0})
    return out


def test_llm_win_rates_against_stub_server(stub_server, capsys):
    judge = LLMJudge(stub_server, "stub", api_key="none", timeout=5, max_retries=0)
    summary, verdicts = llm_win_rates(rows(), judge, betas=[2.0], best_of=[2], seed=3, progress=True)
    assert "6/6 [" in capsys.readouterr().err  # the bar counted every request: 2 methods × 3 prompts
    # VAS vs plain sample 0 ("mid", "short", "tiny"): longer in prompts 0 and 2 → 2/3
    assert summary["vas β=2"]["win_rate"] == pytest.approx(2 / 3) and summary["vas β=2"]["pairs"] == 3
    # Best-of-2 takes the higher reward of samples 1-2: "a", "y", "medium!!" vs "mid", "short", "tiny" → 1/3
    assert summary["best-of-2"]["win_rate"] == pytest.approx(1 / 3)
    assert {v["candidate_first"] for v in verdicts} == {True, False}  # both orders were shown
    with pytest.raises(VasError, match="pool of more than 3"):
        llm_win_rates(rows(), judge, betas=[], best_of=[3])


def test_llm_judge_error_is_one_clear_line(stub_server):
    StubJudge.status = 500
    judge = LLMJudge(stub_server, "stub", api_key="none", timeout=5, max_retries=0)
    with pytest.raises(VasError, match=f"judge endpoint {stub_server} failed"):
        judge.prefer("q", "a", "b")


def test_judge_settings_are_checked_in_the_library():
    from vas.judge import check_judged

    with pytest.raises(VasError, match="nothing to judge: pass --betas and/or --best-of"):
        check_judged([], [])
    with pytest.raises(VasError, match=r"^--timeout must be > 0, got 0$"):
        LLMJudge("http://127.0.0.1:9/v1", "m", api_key="none", timeout=0)
