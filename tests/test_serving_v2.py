"""The VAS processor on vLLM's Model Runner V2 interface without an engine: request slots filled by
``add_request`` (and recycled), rows reordered every step, a preempted request refilled with its prompt and
partial output, a prompt prefilled in chunks and declined requests, driven through the interface with
hand-built request states and contexts on CPU tensors. Every steered row is checked against Eq. 5 computed by
hand with full forwards of tiny value models, every other row against its untouched logits."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import expected, served_value_models

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
    LogitsContext,
    LogitsProcessor,
    LogitsProcRequestState,
)

from vas.serving.processor import VllmLogitsProcessor, take_statistics  # noqa: E402
from vas.serving.v2 import V2Processor  # noqa: E402

V, SLOTS, MAX_LEN = 300, 5, 64


class Runner:
    """The model runner's side of the interface: per-slot committed tokens, prompt and prefill lengths, and
    one ``LogitsContext`` per step (no speculative decoding: one logits row per scheduled request)."""

    def __init__(self, tokenizer_dir: str):
        self.tokens = torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32)
        self.prompt_len = np.zeros(SLOTS, dtype=np.int32)
        self.prefill_len = np.zeros(SLOTS, dtype=np.int32)
        self.total_len = np.zeros(SLOTS, dtype=np.int32)
        self.state = LogitsProcRequestState(
            device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=V,
            all_token_ids=SimpleNamespace(gpu=self.tokens), prompt_len=SimpleNamespace(np=self.prompt_len),
            prefill_len=SimpleNamespace(np=self.prefill_len), total_len=SimpleNamespace(gpu=None))
        self.config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=tokenizer_dir), speculative_config=None)

    def add(self, processor, slot: int, params: SamplingParams, prompt: list[int], output: list[int]) -> bool:
        """A request (re-)enters ``slot`` with its prompt and any output it had before a preemption."""
        filled = prompt + output
        self.tokens[slot, : len(filled)] = torch.tensor(filled)
        self.prompt_len[slot], self.prefill_len[slot], self.total_len[slot] = len(prompt), len(filled), len(filled)
        return processor.add_request(slot, params)

    def context(self, slots: list[int], visible: list[int]) -> LogitsContext:
        """The step's layout: batch position i holds ``slots[i]``, whose sampled token sees ``visible[i]`` tokens."""
        mapping = torch.tensor(slots, dtype=torch.int32)
        return LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=np.array(slots, dtype=np.int32),
                             expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                             input_ids=torch.tensor([int(self.tokens[s, n - 1]) for s, n in zip(slots, visible)]),
                             pos=torch.tensor(visible) - 1, seq_lens_upper_bound_np=np.array(visible, dtype=np.int32))

    def commit(self, slot: int, token: int) -> None:
        """The sampled token is written after the slot's committed tokens, on the device."""
        self.tokens[slot, self.total_len[slot]] = token
        self.total_len[slot] += 1


@pytest.fixture
def runner(tiny_model_dir, tmp_path, monkeypatch):
    served_value_models(tiny_model_dir, tmp_path, monkeypatch)
    return Runner(tiny_model_dir)


def test_the_registered_class_gives_each_runner_its_own_adapter(runner):
    """vLLM's V2 loader accepts the registered class, and its V2 constructor arguments give the V2 adapter."""
    assert issubclass(VllmLogitsProcessor, LogitsProcessor)
    processor = VllmLogitsProcessor(runner.config, runner.state)
    assert isinstance(processor, V2Processor)
    assert processor.steerer.eos == 2  # the tiny tokenizer's EOS, <|im_end|>
    with pytest.raises(ValueError, match="vas_beta must be a number"):
        VllmLogitsProcessor.validate_params(SamplingParams(extra_args={"vas_beta": [1]}))


def test_speculative_decoding_is_refused_at_start(runner):
    runner.config.speculative_config = SimpleNamespace(num_speculative_tokens=2)
    with pytest.raises(ValueError, match="does not run with speculative decoding.*--speculative-config"):
        VllmLogitsProcessor(runner.config, runner.state)


def test_slots_reordered_reused_preempted_prefilled_in_chunks_and_declined(runner):
    """Each step's steered rows equal Eq. 5 by hand; every other row (a declined request, a chunk of a prompt
    still being prefilled) is untouched."""
    processor = VllmLogitsProcessor(runner.config, runner.state)
    models = processor.steerer.models
    torch.manual_seed(0)
    prompts = {"p": [5, 17, 33, 2, 40], "q": [9, 12], "r": [77, 3, 101], "s": [8, 8, 8, 8, 21, 22, 23, 24],
               "t": [11, 12, 13, 14, 15, 16, 17, 18], "u": [44, 45]}
    outputs = {k: [] for k in prompts}
    steering = {"p": {"vas_beta": 2.0, "vas_values": "a=1,b=-0.5"}, "q": None,
                "r": {"vas_beta": -3.0, "vas_top_k": 2, "vas_values": "b,c=0.5"},
                "s": {"vas_beta": 4.0, "vas_soft": True}, "t": {"vas_beta": 1.5, "vas_values": "b,d=-2", "vas_top_k": 5},
                "u": {"vas_beta": 0}}
    temperature = {"p": 0.7, "q": 0.7, "r": 0.0, "s": 1.3, "t": 0.9, "u": 0.7}
    weight = {"p": (1.0, -0.5, 0.0, 0.0), "r": (0.0, 1.0, 0.5, 0.0), "s": (1.0, 1.0, 1.0, 1.0), "t": (0.0, 1.0, 0.0, -2.0)}
    top_k = {"p": 4, "r": 2, "s": 4, "t": 5}
    slot = {}

    def add(name, at):
        slot[name] = at
        params = SamplingParams(temperature=temperature[name], extra_args=steering[name])
        return runner.add(processor, at, params, prompts[name], outputs[name])

    def step(batch: list[str], prefilling: dict[str, int] = {}):
        """One step over ``batch``; a name in ``prefilling`` has fed only that many tokens of its prompt."""
        visible = [prefilling.get(n, len(prompts[n]) + len(outputs[n])) for n in batch]
        logits = torch.randn(len(batch), V) * 3
        out = processor.apply(logits.clone(), runner.context([slot[n] for n in batch], visible))
        for i, name in enumerate(batch):
            if steering[name] is None or not steering[name]["vas_beta"] or name in prefilling:
                torch.testing.assert_close(out[i], logits[i], rtol=0, atol=0)
            else:
                want = expected(models, logits[i], prompts[name], outputs[name], steering[name]["vas_beta"],
                                weight[name], top_k[name], temperature[name] or 1.0, steering[name].get("vas_soft", False))
                torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4)
        for name in batch:
            if name not in prefilling:
                token = int(torch.randint(0, V, ()))
                outputs[name].append(token)
                runner.commit(slot[name], token)

    assert [add("p", 3), add("q", 2), add("r", 1)] == [True, False, True]  # q is declined: no β
    step(["p", "q", "r"])
    step(["r", "p", "q"])  # reordered
    step(["q", "r", "p"])
    # r finishes; its slot is recycled for s (soft values); t's long prompt is prefilled in two chunks
    assert add("s", 1) and add("t", 0)
    step(["s", "p", "q", "t"], prefilling={"t": 5})
    step(["t", "s", "q", "p"])
    # p is preempted, then refilled into another slot with its prompt and partial output; the mean head's
    # window still starts at its prompt
    step(["t", "s", "q"])
    assert add("p", 4)
    step(["p", "t", "s", "q"])
    step(["q", "p", "s", "t"])
    assert sorted(len(s.keys) for s in processor.steerer.scorers) == [3, 3, 3, 3]  # every used value model feeds every steered row
    # s leaves; its slot goes to u, whose β = 0 declines steering: the slot's old steering must not leak
    assert add("u", 1) is False
    step(["u", "q", "p", "t"])
    assert [len(s.keys) for s in processor.steerer.scorers] == [2, 2, 0, 2]  # c is no longer used: its cache is freed
    step(["q", "u"])  # no steered row left: every cache freed
    assert [len(s.keys) for s in processor.steerer.scorers] == [0, 0, 0, 0]


@pytest.mark.parametrize("value, weight", [(torch.nan, 1.0), (1e38, 10.0)])  # a NaN; a weighted sum that overflows
def test_a_value_model_that_fails_ends_only_its_own_request(runner, value, weight):
    """A non-finite value for one request forces that request's EOS from then on (recorded as its error; it
    is no longer scored) and steers the other request as usual, at this step and the next."""
    processor = VllmLogitsProcessor(runner.config, runner.state)
    models = processor.steerer.models
    live = processor.steerer.scorers[0]
    score, scored = live.score, []

    def failing(rollout, candidates, active, beta=None):
        values = score(rollout, candidates, active, beta=beta)
        scored.append([r.steering.record_id for r in rollout.rows])
        for b, row in enumerate(rollout.rows):
            if row.steering.record_id == "x":
                values[b, 1] = value  # x's second candidate
        return values

    live.score = failing
    runner.add(processor, 0, SamplingParams(temperature=0.7, extra_args={"vas_beta": 2.0, "vas_values": f"a={weight}",
                                                                          "vas_id": "x"}), [5, 6, 7], [])
    runner.add(processor, 2, SamplingParams(temperature=0.7, extra_args={"vas_beta": 2.0, "vas_values": "a", "vas_id": "y"}), [9, 12], [])
    for step in range(2):
        logits = torch.randn(2, V)
        out = processor.apply(logits.clone(), runner.context([0, 2], [3 + step, 2 + step]))
        assert out[0, 2] == 0 and bool(torch.isneginf(out[0, torch.arange(V) != 2]).all())  # EOS only
        want = expected(models[:1], logits[1], [9, 12], [3] * step, 2.0, (1.0,), 4, 0.7)
        torch.testing.assert_close(out[1], want, atol=1e-4, rtol=1e-4)
        runner.commit(0, 2)
        runner.commit(2, 3)
    assert scored == [["x", "y"], ["y"]]  # x is not scored once it failed
    records = take_statistics(["x", "y"])
    assert "value model 'a' gave a non-finite value" in records["x"][0].error
    assert [r.error for r in records["y"].values()] == [None, None]


def test_top_k_all_beside_a_small_k_reads_each_value_model_as_little_as_it_can(runner):
    """A request steering every token with the next head beside one with k = 2 on the last head: both equal
    Eq. 5 by hand, and the last head reads only the 2 candidates its request uses, not the vocabulary."""
    processor = VllmLogitsProcessor(runner.config, runner.state)
    models = processor.steerer.models
    live = processor.steerer.scorers[0]
    score, widths = live.score, []

    def spied(rollout, candidates, active, beta=None):
        widths.append(candidates.shape[1])
        return score(rollout, candidates, active, beta=beta)

    live.score = spied
    runner.add(processor, 0, SamplingParams(temperature=0.8, extra_args={"vas_beta": 3.0, "vas_top_k": "all",
                                                                          "vas_values": "d"}), [5, 6, 7], [])
    runner.add(processor, 1, SamplingParams(temperature=0.7, extra_args={"vas_beta": 2.0, "vas_top_k": 2,
                                                                          "vas_values": "a"}), [9, 12], [])
    torch.manual_seed(3)
    outputs = [[], []]
    for step in range(2):
        logits = torch.randn(2, V) * 3
        out = processor.apply(logits.clone(), runner.context([0, 1], [3 + step, 2 + step]))
        torch.testing.assert_close(out[0], expected(models, logits[0], [5, 6, 7], outputs[0], 3.0, (0, 0, 0, 1.0), V, 0.8),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1], expected(models, logits[1], [9, 12], outputs[1], 2.0, (1.0, 0, 0, 0), 2, 0.7),
                                   atol=1e-4, rtol=1e-4)
        for slot, token in enumerate((int(out[0].argmax()), int(out[1].argmax()))):
            outputs[slot].append(token)
            runner.commit(slot, token)
    assert widths == [2, 2]
    with pytest.raises(ValueError, match='vas_top_k "all" needs value models with the next head'):
        VllmLogitsProcessor.validate_params(SamplingParams(extra_args={"vas_beta": 1, "vas_top_k": "all", "vas_values": "a,d"}))
