"""Value heads (last, mean, distributional, next): soft values against closed forms, trimmed tails, two-hot targets and
distributional λ-returns by hand, cached scoring against a full recompute done by hand, save/reload, and soft steering by Eq. 5."""

import math

import pytest
import torch
from helpers import random_value_model, tokens

from vas.errors import VasError
from vas.models import left_pad
from vas.value.heads import TAIL, atoms, soft_value, trim_tails, two_hot
from vas.value.model import ValueModel
from vas.value.scorers import CandidateScorer, TextCandidateScorer
from vas.value.td import lambda_returns

PROMPTS = [[5, 17, 33, 2, 40], [9, 12], [77, 3, 101, 56, 8, 19, 230]]
TEXT_HEADS = [{"head": "last"}, {"head": "mean"}, {"head": "mean", "mean_over": "all"},
              {"head": "distributional", "bins": 11, "support": (-1.0, 1.0)}]
TEXT_HEAD_IDS = ["last", "mean-response", "mean-all", "distributional"]
HEADS = TEXT_HEADS + [{"head": "next"}]  # the next head scores π0's tokens only, never text
HEAD_IDS = TEXT_HEAD_IDS + ["next"]


@pytest.mark.parametrize("beta", [-20.0, -1.0, 1e-9, 0.5, 3.0, 50.0])
@pytest.mark.parametrize("atom", [0, 3, 7, 10])
def test_soft_value_of_a_point_mass_is_its_return(beta, atom):
    support = atoms(-1.0, 1.0, 11)
    log_p = torch.full((11,), -math.inf)
    log_p[atom] = 0.0
    assert float(soft_value(log_p, support, beta)) == pytest.approx(float(support[atom]), abs=1e-6)


def trimmed_by_hand(p, share):
    """Walk up from the lowest atom taking mass until ``share`` is taken, then down from the highest; renormalise."""
    p = [float(x) for x in p]
    for order in (range(len(p)), reversed(range(len(p)))):
        left = share
        for i in order:
            taken = min(left, p[i])
            p[i] -= taken
            left -= taken
    return [x / sum(p) for x in p]


def test_trim_tails_by_hand():
    probs = torch.tensor([[0.02, 0.5, 0.45, 0.03], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(trim_tails(probs, 0.05), torch.tensor([[0.0, 0.47, 0.43, 0.0], [0.0, 0.9, 0.0, 0.0]],
                                                                     dtype=torch.float64) / 0.9)
    torch.testing.assert_close(trim_tails(probs, 0.05)[0], torch.tensor(trimmed_by_hand(probs[0], 0.05), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"the share trimmed from each tail must be in \[0, 0.5\), got 0.5"):
        trim_tails(probs, 0.5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("beta", [-4.0, -0.3, 0.7, 2.0, 10.0])
@pytest.mark.parametrize("tail", [0.0, TAIL])
def test_soft_value_of_a_bernoulli_return(p, beta, tail):
    """Trimmed by ``tail`` at each end, a Bernoulli(p) return keeps p − tail on 1 and 1 − p − tail on 0."""
    support = torch.tensor([0.0, 1.0])
    log_p = torch.log(torch.tensor([1 - p, p]))
    high = (p - tail) / (1 - 2 * tail)
    expected = math.log(1 - high + high * math.exp(beta)) / beta
    assert float(soft_value(log_p, support, beta, tail)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tail", [0.0, TAIL])
def test_soft_value_tends_to_the_mean_as_beta_vanishes(tail):
    support = atoms(-1.0, 1.0, 21)
    p = torch.softmax(torch.randn(21, generator=torch.Generator().manual_seed(0)), dim=0)
    q, z = torch.tensor(trimmed_by_hand(p.double() / p.double().sum(), tail), dtype=torch.float64), support.double()
    mean = float((q * z).sum())
    variance = float((q * (z - mean) ** 2).sum())
    for beta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        # second order: Q_β = mean + β·Var/2 + O(β²) (|third cumulant| ≤ 1 here), up to float32's rounding of the result
        tolerance = 2 * beta**2 + 1e-7
        assert float(soft_value(p.log(), support, beta, tail)) == pytest.approx(mean + beta * variance / 2, abs=tolerance)
        assert float(soft_value(p.log(), support, -beta, tail)) == pytest.approx(mean - beta * variance / 2, abs=tolerance)
    untrimmed = float((p.double() * z).sum() / p.double().sum())
    assert float(soft_value(p.log(), support, None, tail)) == pytest.approx(untrimmed, abs=1e-7)


def test_soft_value_rises_with_beta_towards_the_upper_percentile():
    """Atoms 0, ¼, ½, ¾, 1 with p = .4, .3, .2, .05, .05: trimming 5 % at each end leaves .35 on 0 and .05 on ¾, so
    the soft value runs from 0 (β → −∞) to ¾ (β → +∞), the 5th and 95th percentiles; untrimmed, to 0 and 1."""
    support = atoms(0.0, 1.0, 5)
    log_p = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05]))
    for tail, top in ((TAIL, 0.75), (0.0, 1.0)):
        values = [float(soft_value(log_p, support, b, tail)) for b in (-200.0, -1.0, 1.0, 5.0, 200.0)]
        assert values == sorted(values)
        assert values[0] == pytest.approx(0.0, abs=0.01) and values[-1] == pytest.approx(top, abs=0.02)


def test_a_tiny_upper_tail_does_not_set_the_soft_value():
    """A return that is ⅕ but for 10⁻⁶ of the mass on 1: untrimmed, β = 100 values it at 1 + ln(10⁻⁶)/100 ≈ 0.86
    (exp(100·1 − 13.8) outweighs exp(100·⅕)); trimmed, at ⅕."""
    support = torch.tensor([0.2, 1.0])
    log_p = torch.log(torch.tensor([1 - 1e-6, 1e-6], dtype=torch.float64))
    expected = math.log((1 - 1e-6) * math.exp(20.0) + 1e-6 * math.exp(100.0)) / 100
    assert float(soft_value(log_p, support, 100.0, 0.0)) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.862, abs=1e-3)
    assert float(soft_value(log_p, support, 100.0)) == pytest.approx(0.2, abs=1e-6)


def test_two_hot_by_hand():
    support = torch.tensor([0.0, 0.5, 1.0])
    got = two_hot(torch.tensor([0.2, 0.5, 1.0, 1.7, -3.0]), support)
    expected = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected)


def test_distributional_lambda_returns_by_hand():
    """Two atoms {0, 1}; states s_0, s_1, s_2 = finished with r = 1; λ = 0.5:
    G_2 = δ_1, G_1 = ½·V(s_2 → r) + ½·G_2 = δ_1, G_0 = ½·p(s_1) + ½·G_1."""
    p1 = torch.tensor([0.8, 0.2])
    values = torch.stack([torch.tensor([0.5, 0.5]), p1, torch.tensor([0.9, 0.1])])[None]  # (1, 3, 2)
    reward = torch.tensor([[0.0, 1.0]])
    got = lambda_returns(values, reward, torch.ones(1, 3, dtype=torch.bool), lam=0.5)
    expected = torch.stack([0.5 * p1 + 0.5 * torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(got[0], expected)
    # and its mean is the scalar λ-return of the means
    support = torch.tensor([0.0, 1.0])
    scalar = lambda_returns(values @ support, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool), lam=0.5)
    torch.testing.assert_close(got @ support, scalar)


@torch.no_grad()
def manual_values(model, sequence, prompt_length, beta=None):
    """V of the state ending at the last token of ``sequence``, by hand from the backbone's hidden states (the
    next head: Q(s, x) = w·h_s + b + ê_xᵀ·A·h_s / H of the state before the last token and the last token, ê_x the
    embedding at unit RMS)."""
    ids = torch.tensor([sequence])
    hidden = model.hidden_states(ids, torch.ones_like(ids))[0]  # (S, H)
    if model.kind == "next":
        h, e = hidden[-2], model.backbone.get_input_embeddings().weight[sequence[-1]].float()
        e = e / e.square().mean().sqrt() if bool(e.any()) else e  # the padding token's embedding is 0
        head = model.head
        return float(head.baseline.weight[0] @ h + head.baseline.bias[0] + e @ (head.mix.weight @ h) / len(h))
    if model.kind == "mean":
        start = prompt_length - 1 if model.mean_over == "response" else 0
        feature = hidden[start:].mean(dim=0)
    else:
        feature = hidden[-1]
    out = model.head(feature)
    if model.kind != "distributional":
        return float(out[0])
    # the point value V̂ (the last output), and the histogram's trimmed soft value's excess over its trimmed mean
    point, z = float(out[-1]), model.support.double()
    if not beta:
        return point
    q = torch.tensor(trimmed_by_hand(torch.softmax(out[:-1].double(), dim=0), TAIL), dtype=torch.float64)
    return point + float(torch.log((q * torch.exp(beta * z)).sum()) / beta - (q * z).sum())


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_cached_candidates_equal_full_recompute_for_every_head(tiny_model_dir, head):
    model = random_value_model(tiny_model_dir, seed=2, **head)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    generator = torch.Generator().manual_seed(1)
    prefixes = [list(p) for p in PROMPTS]
    beta = torch.tensor([2.0, -1.5, 0.0]) if head["head"] == "distributional" else None
    scorer = CandidateScorer(model)
    new_ids, new_mask = ids, mask
    for step in range(3):  # the prompt, then two appended tokens
        cands = torch.randint(0, 250, (3, 5), generator=generator)
        got = scorer.score(tokens(new_ids, new_mask), cands, beta=beta)
        expected = torch.tensor([[manual_values(model, prefixes[b] + [int(c)], len(PROMPTS[b]),
                                                None if beta is None or beta[b] == 0 else float(beta[b]))
                                  for c in cands[b]] for b in range(3)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        # the full forward agrees at every state too
        for b in range(3):
            full = model(torch.tensor([prefixes[b]]), torch.ones(1, len(prefixes[b]), dtype=torch.long),
                         prompt_lengths=torch.tensor([len(PROMPTS[b])]))[0, -1]
            assert float(full) == pytest.approx(manual_values(model, prefixes[b], len(PROMPTS[b])), abs=1e-4)
        chosen = cands[:, step : step + 1]
        for b in range(3):
            prefixes[b].append(int(chosen[b]))
        new_ids, new_mask = chosen, torch.ones_like(chosen)


def test_a_reordered_mean_head_row_starts_its_window_at_its_prompt(tiny_model_dir):
    """A server feeds a request that joins late its prompt and earlier output at once; the rollout's
    ``prompt_lengths`` says where the prompt ends."""
    from types import SimpleNamespace

    from vas.policy.local import Appended

    model = random_value_model(tiny_model_dir, seed=4, head="mean")
    scorer = CandidateScorer(model)
    cands = torch.tensor([[7, 8, 9]])
    scorer.score(tokens(torch.tensor([PROMPTS[0]]), torch.ones(1, 5, dtype=torch.long)), cands)
    scorer.reorder([0, -1])  # a second request joins with prompt PROMPTS[1] and two output tokens
    joined = PROMPTS[1] + [60, 61]
    ids, mask = left_pad([[int(cands[0, 0])], joined], pad_id=0)
    both = torch.tensor([[7, 8, 9], [10, 11, 12]])
    rollout = SimpleNamespace(appended=Appended(ids, mask, torch.tensor([5, 2])))
    got = scorer.score(rollout, both)
    first = PROMPTS[0] + [7]
    expected = torch.tensor([[manual_values(model, first + [c], 5) for c in (7, 8, 9)],
                             [manual_values(model, joined + [c], 2) for c in (10, 11, 12)]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("head", TEXT_HEADS, ids=TEXT_HEAD_IDS)
def test_text_scorer_equals_full_recompute_for_every_head(tiny_model_dir, head):
    from vas.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = random_value_model(tiny_model_dir, seed=6, **head)
    prompt_ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    scorer = TextCandidateScorer(model, tokenizer, prompt_ids)
    beta = 3.0 if head["head"] == "distributional" else None
    text = ""
    for piece in ("good", " day", " to you"):
        candidates = [text + " yes", text + "x", None, text + " not at all"]
        got = scorer.score(text, candidates, beta)
        expected = torch.tensor([manual_values(model, scorer.sequence(text, c), len(prompt_ids), beta)
                                 for c in candidates])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        text += piece


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_save_and_reload_keeps_the_head(tiny_model_dir, tmp_path, head):
    model = random_value_model(tiny_model_dir, seed=5, **head)
    model.save_pretrained(tmp_path / "v")
    reloaded = ValueModel.from_pretrained(tmp_path / "v")
    assert (reloaded.kind, reloaded.mean_over) == (model.kind, model.mean_over)
    ids = torch.tensor([PROMPTS[2]])
    lengths = torch.tensor([3])
    for beta in (None, 4.0):
        torch.testing.assert_close(reloaded(ids, torch.ones_like(ids), prompt_lengths=lengths, beta=beta),
                                   model(ids, torch.ones_like(ids), prompt_lengths=lengths, beta=beta), atol=1e-4, rtol=0)


def test_bad_heads_are_refused(tiny_model_dir):
    with pytest.raises(VasError, match="--head must be one of last, mean, distributional, next, got 'max'"):
        ValueModel.create(tiny_model_dir, head="max")
    with pytest.raises(VasError, match="--mean-over must be one of response, all"):
        ValueModel.create(tiny_model_dir, head="mean", mean_over="prompt")
    with pytest.raises(VasError, match="needs --bins ≥ 2 and a reward range low < high"):
        ValueModel.create(tiny_model_dir, head="distributional", support=(1.0, 1.0))


def test_soft_steering_is_eq5_with_soft_values(tiny_model_dir):
    """One step of VAS with --soft: π ∝ π0·exp(β·w·Q_{β·w}) on the top-k and β·mean(w·Q) elsewhere, computed by
    hand from the value model's outputs; a value model with one value per state refuses --soft."""
    from vas.decoding.guidance import steered_logprobs
    from vas.decoding.loop import Steering, steer

    model = random_value_model(tiny_model_dir, seed=8, head="distributional", bins=11, support=(-1.0, 1.0))
    ids, mask = left_pad(PROMPTS, pad_id=0)
    base = torch.log_softmax(torch.randn(3, 256, generator=torch.Generator().manual_seed(3)), dim=-1)
    beta = torch.tensor([4.0, 1.0, -2.0])
    steering = Steering([model], [0.5], beta=beta, top_k=6, soft=True)
    got = steer(steering.rows(3), [CandidateScorer(model)], tokens(ids, mask), base, torch.ones(3, dtype=torch.bool),
                top_k=6)
    candidates = base.topk(6, dim=-1).indices
    soft = torch.tensor([[manual_values(model, PROMPTS[b] + [int(c)], len(PROMPTS[b]), float(beta[b]) * 0.5)
                          for c in candidates[b]] for b in range(3)])
    torch.testing.assert_close(got, steered_logprobs(base, candidates, 0.5 * soft, beta), atol=1e-4, rtol=0)
    plain = steer(Steering([model], [0.5], beta=beta, top_k=6).rows(3), [CandidateScorer(model)], tokens(ids, mask), base,
                  torch.ones(3, dtype=torch.bool), top_k=6)
    assert not torch.allclose(plain, got, atol=1e-3)  # the mean and the soft value differ
    with pytest.raises(VasError, match="soft needs a distributional value model"):
        Steering([random_value_model(tiny_model_dir)], beta=1.0, soft=True)


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_training_reads_each_state_as_decoding_does(tiny_model_dir, head):
    """The training batch (right padding, rows of different lengths) gives every state s_0 … s_T the value computed
    by hand from that state's own tokens: the mean window starts at the prompt's last token in both."""
    from vas.value.train import ValueCollator, state_values

    model = random_value_model(tiny_model_dir, seed=9, **head)
    rows = [{"prompt_ids": PROMPTS[0], "response_ids": [60, 61, 62], "reward": 1.0},
            {"prompt_ids": PROMPTS[1], "response_ids": [70], "reward": 0.0},
            {"prompt_ids": PROMPTS[2], "response_ids": [80, 81], "reward": 0.5}]
    batch = ValueCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        got = state_values(model, batch)
    first = 1 if head["head"] == "next" else 0  # no token of the row leads to s_0: not a next-head state
    for b, row in enumerate(rows):
        for t in range(first, len(row["response_ids"]) + 1):
            state = row["prompt_ids"] + row["response_ids"][:t]
            assert float(got[b, t]) == pytest.approx(manual_values(model, state, len(row["prompt_ids"])), abs=1e-4)


def test_mean_head_rows_keep_their_windows_when_the_batch_is_permuted(tiny_model_dir):
    model = random_value_model(tiny_model_dir, seed=10, head="mean")
    scorer = CandidateScorer(model)
    ids, mask = left_pad(PROMPTS[:2], pad_id=0)
    cands = torch.tensor([[7, 8], [9, 10]])
    scorer.score(tokens(ids, mask), cands)
    scorer.reorder([1, 0])
    chosen = torch.tensor([[10], [7]])  # row 0 is now the second prompt
    got = scorer.score(tokens(chosen, torch.ones_like(chosen)), torch.tensor([[3, 4], [5, 6]]))
    expected = torch.tensor([[manual_values(model, PROMPTS[1] + [10, c], 2) for c in (3, 4)],
                             [manual_values(model, PROMPTS[0] + [7, c], 5) for c in (5, 6)]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_transformers_processor_starts_the_mean_window_at_the_prompt_after_a_rewind(tiny_model_dir):
    """The LogitsProcessor rebuilds its caches from the whole sequence when generate rewinds or starts over; the
    mean head's window must still start at each prompt's last token, not at the last generated one."""
    from vas.decoding.loop import Steering
    from vas.decoding.processor import VASLogitsProcessor

    model = random_value_model(tiny_model_dir, seed=11, head="mean")
    ids, mask = left_pad(PROMPTS[:2], pad_id=0)
    processor = VASLogitsProcessor(Steering([model], beta=2.0, top_k=3), mask, temperature=1.0)
    scores = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    generated = torch.cat([ids, torch.tensor([[20, 21], [22, 23]])], dim=1)  # the first call: two tokens in already
    got = processor(generated, scores.clone())
    base = torch.log_softmax(scores, dim=-1)
    for b, prompt in enumerate(PROMPTS[:2]):
        candidates = base[b].topk(3).indices
        values = torch.tensor([manual_values(model, prompt + generated[b, -2:].tolist() + [int(c)], len(prompt))
                               for c in candidates])
        expected = base[b].clone()
        expected[candidates] += 2.0 * (values - values.mean())
        torch.testing.assert_close(got[b], torch.log_softmax(expected, dim=-1), atol=1e-4, rtol=0)


def test_the_next_head_reads_text_nowhere(tiny_model_dir):
    from vas.models import load_tokenizer

    model = random_value_model(tiny_model_dir, seed=6, head="next")
    with pytest.raises(VasError, match="next head scores π0's own next tokens, not text"):
        TextCandidateScorer(model, load_tokenizer(tiny_model_dir), [5, 6])


def test_next_head_training_targets_of_a_hand_worked_trajectory():
    """Q(s_t, x_{t+1}) regresses the λ-return of s_{t+1}: with V(s_1) = 0.2, V(s_2) = 0.6, r = 1, λ = 0.5 the
    targets are G_1 = ½·0.6 + ½·1 = 0.8 and G_2 = 1 (G_3 = r for the finished state s_3); s_0 is not regressed
    and padding never is."""
    from vas.value.train import regressed_states

    values = torch.tensor([[9.0, 0.2, 0.6, 0.7], [9.0, 0.3, 0.0, 0.0]])  # s_0 … s_3; row 2 ends at s_1
    state_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    targets = lambda_returns(values, torch.tensor([1.0, 0.0]), state_mask, lam=0.5)
    regressed = regressed_states("next", state_mask)
    assert regressed.tolist() == [[False, True, True, True], [False, True, False, False]]
    torch.testing.assert_close(targets[regressed], torch.tensor([0.5 * 0.6 + 0.5 * (0.5 * 1.0 + 0.5 * 1.0), 1.0, 1.0, 0.0]))
    assert torch.equal(regressed_states("last", state_mask), state_mask)


def test_next_head_scores_the_whole_vocabulary_as_it_scores_a_few(tiny_model_dir):
    """Q(s, ·) over every token (one product with the embedding matrix) equals the candidates' gathered values,
    past the gather limit too."""
    from vas.value.heads import GATHER_LIMIT

    model = random_value_model(tiny_model_dir, seed=12, head="next")
    hidden = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    everything = model.head(hidden)  # (2, V)
    V = model.head.embedding_weight.shape[0]
    assert everything.shape == (2, V)
    few = torch.tensor([[4, 9, 0], [V - 1, 7, 7]])
    torch.testing.assert_close(model.head(hidden, few), everything.gather(1, few))
    many = torch.arange(V).flip(0).expand(2, V)[:, : GATHER_LIMIT + 1]
    torch.testing.assert_close(model.head(hidden, many), everything.gather(1, many))
    e = model.head.embedding_weight[5]
    by_hand = (hidden[1] @ model.head.baseline.weight[0] + model.head.baseline.bias[0]
               + e @ (model.head.mix.weight @ hidden[1]) / e.square().mean().sqrt() / 32)
    assert float(everything[1, 5]) == pytest.approx(float(by_hand), abs=1e-5)
    # ids beyond the embedding (the padding rows of a wider LM head) get the baseline
    beyond = model.head(hidden, torch.tensor([[V, V + 3], [5, V]]))
    baseline = hidden @ model.head.baseline.weight[0] + model.head.baseline.bias[0]
    torch.testing.assert_close(beyond, torch.stack([baseline[0].expand(2), torch.stack([everything[1, 5], baseline[1]])]))


def test_top_k_all_is_eq5_over_the_whole_vocabulary(tiny_model_dir):
    """k = all with a next-token value model: every token x gets log π0(x) + β·Q(s, x), normalised (Eq. 5 with no
    token outside the top-k), by hand from full forwards; a head that reads one candidate per token refuses it."""
    from vas.decoding.loop import ALL, Steering, steer

    model = random_value_model(tiny_model_dir, seed=13, head="next")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    V = model.head.embedding_weight.shape[0]
    base = torch.log_softmax(torch.randn(3, V, generator=torch.Generator().manual_seed(4)), dim=-1)
    beta = torch.tensor([1.5, -0.5, 0.0])
    steering = Steering([model], [0.7], beta=beta, top_k=ALL)
    got = steer(steering.rows(3), [CandidateScorer(model)], tokens(ids, mask), base, torch.ones(3, dtype=torch.bool),
                top_k=ALL)
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            values = torch.tensor([manual_values(model, prompt + [x], len(prompt)) for x in range(V)])
        expected = torch.log_softmax(base[b] + float(beta[b]) * 0.7 * values, dim=-1)
        torch.testing.assert_close(got[b], expected, atol=1e-4, rtol=0)
    assert torch.equal(got[2], base[2])  # β = 0: π0 itself
    with pytest.raises(VasError, match=r"top_k 'all' needs value models with the next head; 'value_models\[0\]' has the last head"):
        Steering([random_value_model(tiny_model_dir)], top_k=ALL)


def test_next_head_rows_follow_a_reordered_batch(tiny_model_dir):
    """A server's batch changes: a kept row keeps its state, a new row (-1) is fed from its prompt."""
    model = random_value_model(tiny_model_dir, seed=14, head="next")
    scorer = CandidateScorer(model)
    ids, mask = left_pad(PROMPTS[:2], pad_id=0)
    scorer.score(tokens(ids, mask), torch.tensor([[7, 8], [9, 10]]))
    scorer.reorder([1, -1])
    new_ids, new_mask = left_pad([[10], PROMPTS[2]], pad_id=0)
    got = scorer.score(tokens(new_ids, new_mask), torch.tensor([[3, 4], [5, 6]]))
    expected = torch.tensor([[manual_values(model, PROMPTS[1] + [10, c], 2) for c in (3, 4)],
                             [manual_values(model, PROMPTS[2] + [c], 7) for c in (5, 6)]])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_next_head_training_loss_leaves_s0_out(tiny_model_dir, tmp_path):
    """ValueTrainer's loss for a next head: the mean of (V(s_t) − G_t)² over t = 1 … T of every row, worked out
    state by state here (s_0, which no response token leads to, is not in it)."""
    from transformers import TrainingArguments

    from vas.value.train import ValueCollator, ValueTrainer, state_values

    model = random_value_model(tiny_model_dir, seed=15, head="next")
    rows = [{"prompt_ids": PROMPTS[0], "response_ids": [60, 61, 62], "reward": 1.0},
            {"prompt_ids": PROMPTS[1], "response_ids": [70], "reward": 0.0}]
    batch = ValueCollator(pad_token_id=0)(rows)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = ValueTrainer(model=model, args=args, lam=0.5)
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        values = state_values(model, batch)
    squares = []
    for b, row in enumerate(rows):
        T = len(row["response_ids"])
        g = row["reward"]  # G_T = r, then G_t = ½·V(s_{t+1}) + ½·G_{t+1}, backwards
        targets = {T: g}
        for t in range(T - 1, -1, -1):
            targets[t] = 0.5 * float(values[b, t + 1]) + 0.5 * targets[t + 1] if t + 1 < T else 0.5 * row["reward"] + 0.5 * targets[t + 1]
        squares += [(float(values[b, t]) - targets[t]) ** 2 for t in range(1, T + 1)]
        with_s0 = squares + [(float(values[b, 0]) - targets[0]) ** 2]
    assert loss == pytest.approx(sum(squares) / len(squares), rel=1e-5)
    assert loss != pytest.approx(sum(with_s0) / len(with_s0), rel=1e-3)


def test_distributional_training_loss_by_hand(tiny_model_dir, tmp_path):
    """ValueTrainer's loss for a distributional head, worked out state by state (λ = ½, atoms 0, ½, 1): the point
    value's squared error to its λ-returns G_t (G_T = r), plus the histogram's cross-entropy to distributional
    λ-returns that end at two-hot(V̂(s_T)), the point value of the finished state, not at the reward."""
    from transformers import TrainingArguments

    from vas.value.train import ValueCollator, ValueTrainer, state_outputs

    model = random_value_model(tiny_model_dir, seed=16, head="distributional", bins=3, support=(0.0, 1.0))
    rows = [{"prompt_ids": PROMPTS[0], "response_ids": [60, 61, 62], "reward": 1.0},
            {"prompt_ids": PROMPTS[1], "response_ids": [70], "reward": 0.0}]
    batch = ValueCollator(pad_token_id=0)(rows)
    trainer = ValueTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                           lam=0.5)
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        outputs = state_outputs(model, batch).double()

    def two_hot_by_hand(v):  # atoms 0, ½, 1
        v = min(max(v, 0.0), 1.0)
        if v <= 0.5:
            return [1 - 2 * v, 2 * v, 0.0]
        return [0.0, 2 - 2 * v, 2 * v - 1]

    terms = []
    for b, row in enumerate(rows):
        T = len(row["response_ids"])
        p = [torch.softmax(outputs[b, t, :3], dim=0) for t in range(T + 1)]
        point = [float(outputs[b, t, 3]) for t in range(T + 1)]
        g, z = {T: row["reward"]}, {T: torch.tensor(two_hot_by_hand(point[T]), dtype=torch.float64)}
        for t in range(T - 1, -1, -1):  # the next state's own value, except s_T's, which is the end of the return
            g[t] = 0.5 * (point[t + 1] if t + 1 < T else row["reward"]) + 0.5 * g[t + 1]
            z[t] = 0.5 * (p[t + 1] if t + 1 < T else z[T]) + 0.5 * z[t + 1]
        terms += [float(-(z[t] * p[t].log()).sum()) + (point[t] - g[t]) ** 2 for t in range(T + 1)]
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_the_histogram_trains_only_its_own_rows():
    """The distributional head's histogram logits are a linear map of detached hidden states: their gradient reaches
    the head's histogram rows, never the hidden states; V̂'s reaches both (the backbone learns what V̂ needs)."""
    from vas.value.heads import DistributionalHead

    head = DistributionalHead(4, 3)
    hidden = torch.randn(2, 4, requires_grad=True)
    head(hidden)[:, :2].sum().backward()
    assert not hidden.grad.any() and head.weight.grad[:2].abs().sum() > 0
    head(hidden)[:, 2].sum().backward()
    torch.testing.assert_close(hidden.grad, head.weight[2].detach().expand(2, 4))


def test_a_histogram_only_model_from_before_the_point_value_still_loads(tiny_model_dir, tmp_path):
    """A distributional value model saved before the point value (bins outputs, no ``point_value`` in its config) is
    valued at its histogram's mean, and its soft value is that mean plus the trimmed histogram's excess, by hand;
    asking it for V̂ is refused in one line."""
    import json

    from safetensors.torch import load_file, save_file

    model = random_value_model(tiny_model_dir, seed=17, head="distributional", bins=5, support=(0.0, 1.0))
    model.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "vas_value_config.json"
    config = json.loads(config_path.read_text())
    del config["point_value"]
    config_path.write_text(json.dumps(config))
    head = load_file(tmp_path / "old" / "value_head.safetensors")
    save_file({name: tensor[:5].contiguous() for name, tensor in head.items()}, tmp_path / "old" / "value_head.safetensors")
    old = ValueModel.from_pretrained(tmp_path / "old")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        outputs = old(ids, torch.ones_like(ids), head_outputs=True)[0, -1]
        p = torch.softmax(outputs.double(), dim=0)
    assert outputs.shape == (5,)
    z = torch.linspace(0, 1, 5, dtype=torch.float64)
    mean = float((p * z).sum())
    q = torch.tensor(trimmed_by_hand(p, TAIL), dtype=torch.float64)
    soft = mean + float(torch.log((q * torch.exp(3.0 * z)).sum()) / 3.0 - (q * z).sum())
    assert float(old.values(outputs)) == pytest.approx(mean, abs=1e-6)
    assert float(old.values(outputs, 3.0)) == pytest.approx(soft, abs=1e-6)
    with pytest.raises(VasError, match="this distributional value model has no point value: it was trained by an older vas"):
        old.point_values(outputs)
