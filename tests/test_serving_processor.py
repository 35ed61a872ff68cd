"""The vLLM logits processor without an engine: request parsing, and the per-request bookkeeping of a
changing batch (adds, swaps, moves, removals, a preempted request coming back) against Eq. 5 computed by hand
with full forwards of a tiny value model."""

from types import SimpleNamespace

import pytest
import torch
from helpers import expected, random_value_model, served_value_models, tokens

pytest.importorskip("vllm.v1.sample.logits_processor")  # the V1 interface (vLLM < 0.34)

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from vas.serving.processor import (  # noqa: E402
    RequestSteering,
    Settings,
    VllmLogitsProcessor,
    parse_request,
)
from vas.value.scorers import CandidateScorer  # noqa: E402



@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    """Two served value models, a (last head) and d (next head): only their configs, which parsing reads."""
    import json

    from vas.value.model import CONFIG_NAME

    folders = {}
    for name, head in (("a", "last"), ("d", "next")):
        folders[name] = tmp_path_factory.mktemp(name)
        (folders[name] / CONFIG_NAME).write_text(json.dumps({"head": head}))
    return Settings({"a": str(folders["a"]), "b": str(folders["d"])}, vocab_size=300, top_k=10, max_top_k=100)


def test_a_request_is_parsed_into_its_steering(settings):
    assert parse_request(None, settings) is None
    assert parse_request({"vas_beta": 0, "vas_values": "a=2"}, settings) is None
    assert parse_request({"vas_beta": "1.5"}, settings) == RequestSteering(1.5, 10, (1.0, 1.0))
    assert parse_request({"vas_beta": -2, "vas_top_k": 7, "vas_values": "b=0.5"}, settings) == RequestSteering(-2.0, 7, (0.0, 0.5))
    assert parse_request({"vas_beta": 3, "vas_values": " b = -1 , a"}, settings) == RequestSteering(3.0, 10, (1.0, -1.0))
    assert parse_request({"vas_beta": 3, "vas_values": "a=0,b=0"}, settings) is None  # nothing to steer with
    # b has the next head: k = all (the vocabulary), and k beyond --max-top-k, cost it nothing more
    assert parse_request({"vas_beta": 1, "vas_top_k": "ALL", "vas_values": "b"}, settings) == RequestSteering(1.0, 300, (0.0, 1.0))
    assert parse_request({"vas_beta": 1, "vas_top_k": 250, "vas_values": "a=0,b"}, settings) == RequestSteering(1.0, 250, (0.0, 1.0))


@pytest.mark.parametrize("args, field", [
    ({"vas_beta": "abc"}, "vas_beta"),
    ({"vas_beta": "nan"}, "vas_beta"),
    ({"vas_beta": "inf"}, "vas_beta"),
    ({"vas_beta": [1]}, "vas_beta"),
    ({"vas_beta": 1, "vas_values": "c=1"}, "unknown value model 'c'"),
    ({"vas_beta": 1, "vas_values": "a=nan"}, "weight of 'a'"),
    ({"vas_beta": 1, "vas_values": "a=1,a=2"}, "twice"),
    ({"vas_beta": 1, "vas_top_k": 0}, "vas_top_k"),
    ({"vas_beta": 1, "vas_top_k": 301}, "vas_top_k"),
    ({"vas_beta": 1, "vas_top_k": 2.5}, "vas_top_k"),
    ({"vas_bta": 1}, "vas_bta"),
    ({"vas_beta": 1, "vas_top_k": 101}, "at most the server's --max-top-k 100 for value model 'a'"),
    ({"vas_beta": 1, "vas_top_k": "all"}, "vas_top_k \"all\" needs value models with the next head; 'a'"),
    ({"vas_beta": 1, "vas_top_k": "every"}, "vas_top_k"),
    ({"vas_beta": 1e300}, "vas_beta"),
    ({"vas_beta": 1e30, "vas_values": "a=1e10"}, "float32"),
])
def test_bad_requests_name_the_field(args, field, settings):
    with pytest.raises(ValueError, match=field):
        parse_request(args, settings)


@pytest.mark.parametrize("body, message", [
    ({"vas_beta": 3}, "vas_beta must go inside vllm_xargs"),
    ({"VAS_BETA": 3, "vllm_xargs": {}}, "VAS_BETA must go inside vllm_xargs"),
    ({"vllm_xargs": {"VAS_BETA": 2}}, "unknown field 'VAS_BETA'"),
    ({"vllm_xargs": {"vas_beta": True}}, "vas_beta must be a number"),
    ({"vllm_xargs": {"vas_beta": None}}, "vas_beta must be a number"),
    ({"vllm_xargs": {"vas_beta": 1, "vas_values": ""}}, "non-empty"),
    ({"vllm_xargs": {"vas_beta": 1, "vas_values": "a=1,"}}, "empty entry"),
    ({"vllm_xargs": {"vas_beta": 1, "vas_top_k": 1e30}}, "vas_top_k must be between 1 and 100"),
])
def test_request_bodies_with_misplaced_or_bad_fields_are_refused(body, message, settings):
    from vas.serving.processor import request_error

    assert message in request_error(body, settings)


def test_soft_values_need_a_distributional_value_model(tiny_model_dir, tmp_path):
    for name, head in (("last", {}), ("dist", {"head": "distributional", "support": (0.0, 1.0)})):
        random_value_model(tiny_model_dir, **head).save_pretrained(tmp_path / name)
    settings = Settings({"last": str(tmp_path / "last"), "dist": str(tmp_path / "dist")}, vocab_size=300)
    assert parse_request({"vas_beta": 2, "vas_soft": True}, settings) == RequestSteering(2.0, 10, (1.0, 1.0), soft=True)
    assert parse_request({"vas_beta": 2, "vas_soft": False, "vas_values": "last"}, settings).soft is False
    # over HTTP, vLLM's vllm_xargs model (str | int | float values) turns JSON true into 1
    assert parse_request({"vas_beta": 2, "vas_soft": 1}, settings).soft is True
    assert parse_request({"vas_beta": 2, "vas_soft": "False"}, settings).soft is False
    with pytest.raises(ValueError, match="vas_soft must be true or false, got 2"):
        parse_request({"vas_beta": 2, "vas_soft": 2}, settings)
    with pytest.raises(ValueError, match="vas_soft needs a distributional value model with a weight ≠ 0"):
        parse_request({"vas_beta": 2, "vas_soft": True, "vas_values": "last=1,dist=0"}, settings)
    with pytest.raises(ValueError, match="vas_soft must be true or false, got 'yes'"):
        parse_request({"vas_beta": 2, "vas_soft": "yes"}, settings)


def test_good_request_bodies_pass(settings):
    from vas.serving.processor import request_error

    assert request_error({"prompt": "hi"}, settings) is None
    assert request_error({"prompt": "hi", "vllm_xargs": {"vas_beta": 2, "vas_values": "a=1,b"}}, settings) is None


def test_rows_that_join_leave_and_move_keep_their_own_cache(tiny_model_dir):
    """A CandidateScorer reordered between steps scores each row as a scorer of that row alone does."""
    model = random_value_model(tiny_model_dir, seed=3)
    sequences = {"x": [5, 17, 33, 2], "y": [9, 12], "z": [77, 3, 101, 56, 8]}
    candidates = torch.tensor([[4, 6, 8]])

    def alone(name, length):
        with torch.no_grad():
            ids = torch.tensor([sequences[name][:length] + [int(c)] for c in candidates[0]])
            return model(ids, torch.ones_like(ids))[:, -1]

    shared = CandidateScorer(model)

    def feed(rows, news):
        P = max(map(len, news))
        ids = torch.zeros(len(news), P, dtype=torch.long)
        mask = torch.zeros(len(news), P, dtype=torch.long)
        for i, n in enumerate(news):
            if n:
                ids[i, P - len(n):], mask[i, P - len(n):] = torch.tensor(n), 1
        return shared.score(tokens(ids, mask), candidates.expand(len(news), -1))

    values = feed(["x", "y"], [sequences["x"][:3], sequences["y"][:1]])
    torch.testing.assert_close(values[0], alone("x", 3))
    torch.testing.assert_close(values[1], alone("y", 1))
    shared.reorder([-1, 1])  # x leaves, z joins in front, y moves to row 1
    values = feed(["z", "y"], [sequences["z"][:4], sequences["y"][1:2]])
    torch.testing.assert_close(values[0], alone("z", 4), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values[1], alone("y", 2), atol=1e-5, rtol=1e-4)
    shared.reorder([1, 0])  # swap; the columns only x used are gone
    assert shared.past_mask.bool().any(dim=0).all()
    values = feed(["y", "z"], [[], sequences["z"][4:5]])  # y gets no new token this step
    torch.testing.assert_close(values[0], alone("y", 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values[1], alone("z", 5), atol=1e-5, rtol=1e-4)


def test_rows_joining_at_different_steps_do_not_widen_the_cache(tiny_model_dir):
    """Prompts of 20 tokens join every other step while older rows leave: the cache stays near the longest
    row's width, and every row still scores as it does alone."""
    model = random_value_model(tiny_model_dir, seed=4)
    scorer = CandidateScorer(model)
    candidates = torch.tensor([[4, 6]])
    torch.manual_seed(0)
    rows: list[list[int]] = []
    for step in range(16):
        fresh = step % 2 == 0
        keep = list(range(max(0, len(rows) - 6), len(rows)))  # the 6 newest rows stay
        order = keep + ([-1] if fresh else [])
        if rows:
            scorer.reorder(order)
        rows = [rows[i] for i in keep] + ([torch.randint(3, 250, (20,)).tolist()] if fresh else [])
        fed = scorer.lengths.tolist() if scorer.lengths is not None else [0] * len(rows)
        for r in rows:
            r.append(int(torch.randint(3, 250, ())))
        news = [r[n:] for r, n in zip(rows, fed)]
        P = max(map(len, news))
        ids = torch.zeros(len(news), P, dtype=torch.long)
        mask = torch.zeros(len(news), P, dtype=torch.long)
        for i, n in enumerate(news):
            ids[i, P - len(n):], mask[i, P - len(n):] = torch.tensor(n), 1
        values = scorer.score(tokens(ids, mask), candidates.expand(len(rows), -1))
        for i, r in enumerate(rows):
            with torch.no_grad():
                alone = torch.tensor([r + [int(c)] for c in candidates[0]])
                torch.testing.assert_close(values[i], model(alone, torch.ones_like(alone))[:, -1], atol=1e-5, rtol=1e-4)
    longest = max(map(len, rows))
    assert scorer.past_mask.shape[1] <= 1.5 * longest + 8 + 21  # at most one step's new prompt beyond the bound


@pytest.fixture
def processor(tiny_model_dir, tmp_path, monkeypatch):
    served_value_models(tiny_model_dir, tmp_path, monkeypatch)
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=tiny_model_dir))
    return VllmLogitsProcessor(config, torch.device("cpu"), False)


def test_the_processor_follows_the_batch(processor):
    """Adds, a plain request, a swap, a one-way move, a removal and a preempted request re-added with its
    output so far: every steered row equals Eq. 5 by hand, every other row is untouched."""
    torch.manual_seed(0)
    V = 300
    prompts = {"p": [5, 17, 33, 2, 40], "q": [9, 12], "r": [77, 3, 101], "s": [8, 8, 8, 8]}
    outputs = {k: [] for k in prompts}
    steering = {"p": {"vas_beta": 2.0, "vas_values": "a=1,b=-0.5"}, "q": None,
                "r": {"vas_beta": -3.0, "vas_top_k": 2, "vas_values": "b,c=0.5"}, "s": {"vas_beta": 4.0, "vas_soft": True}}
    temperature = {"p": 0.7, "q": 0.7, "r": 0.0, "s": 1.3}
    weight = {"p": (1.0, -0.5, 0.0, 0.0), "r": (0.0, 1.0, 0.5, 0.0), "s": (1.0, 1.0, 1.0, 1.0)}
    top_k = {"p": 4, "r": 2, "s": 4}

    def added(index, name):
        params = SamplingParams(temperature=temperature[name], extra_args=steering[name])
        return (index, params, prompts[name], outputs[name])

    def step(batch: list[str]):
        logits = torch.randn(len(batch), V) * 3
        out = processor.apply(logits.clone())
        for i, name in enumerate(batch):
            if steering[name] is None:
                torch.testing.assert_close(out[i], logits[i])
            else:
                tau = temperature[name] or 1.0
                want = expected(processor.steerer.models, logits[i], prompts[name], outputs[name], steering[name]["vas_beta"],
                                weight[name], top_k[name], tau, steering[name].get("vas_soft", False))
                torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4)
        for name in batch:  # vLLM appends each sampled token to the live output list
            outputs[name].append(int(torch.randint(0, V, ())))

    processor.update_state(BatchUpdate(3, removed=[], added=[added(0, "p"), added(1, "q"), added(2, "r")], moved=[]))
    step(["p", "q", "r"])
    processor.update_state(None)
    step(["p", "q", "r"])
    processor.update_state(BatchUpdate(3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    step(["r", "q", "p"])
    processor.update_state(BatchUpdate(3, removed=[1], added=[added(1, "s")], moved=[]))
    step(["r", "s", "p"])
    processor.update_state(BatchUpdate(2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    step(["p", "s"])
    # r was preempted: it comes back as an addition with its output so far
    processor.update_state(BatchUpdate(3, removed=[], added=[added(2, "r")], moved=[]))
    step(["p", "s", "r"])
    assert sorted(len(s.keys) for s in processor.steerer.scorers) == [3, 3, 3, 3]
    processor.update_state(BatchUpdate(1, removed=[1, 2], added=[], moved=[]))
    step(["p"])
    assert [len(s.keys) for s in processor.steerer.scorers] == [1, 1, 0, 0]  # c and d are no longer used: caches freed


def test_recorded_steps_give_back_pi0_and_the_kl(processor):
    """The offline engine reads log π0(x) = log π(x) − shift(x) and the KL from the recorded steps: checked
    for every token of the vocabulary against π0 and π computed here."""
    from vas.serving.engine import _shift
    from vas.serving.processor import take_statistics

    torch.manual_seed(1)
    params = SamplingParams(temperature=0.7, extra_args={"vas_beta": 5.0, "vas_top_k": 3, "vas_id": "r1"})
    processor.update_state(BatchUpdate(1, removed=[], added=[(0, params, [5, 17, 33], [])], moved=[]))
    logits = torch.randn(1, 300) * 3
    logp = torch.log_softmax(processor.apply(logits.clone())[0] / 0.7, dim=-1)  # vLLM divides by τ
    base = torch.log_softmax(logits[0] / 0.7, dim=-1)
    step = take_statistics(["r1"])["r1"][0]
    assert len(step.candidates) == 3
    shifts = torch.tensor([_shift(step, x) for x in range(300)])
    torch.testing.assert_close(logp - shifts, base, atol=1e-5, rtol=0)
    assert step.kl == pytest.approx(float((logp.exp() * (logp - base)).sum()), rel=1e-4)
    assert step.kl > 0.01
    assert take_statistics(["r1"]) == {}  # fetched once, then gone
