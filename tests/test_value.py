"""The value model: cached candidate scoring against full recomputes, batch rows against single rows,
save/load round trips and the tokenizer check."""

import pytest
import torch
from conftest import make_tiny_model_dir
from helpers import random_value_model, tokens
from transformers import AutoModel

from vas.errors import VasError
from vas.models import load_tokenizer
from vas.models import left_pad
from vas.value.model import (
    ValueModel,
    check_same_tokenizer,
    load_value_tokenizer,
)
from vas.value.scorers import CandidateScorer

PROMPTS = [[5, 17, 33, 2, 40], [9, 12], [77, 3, 101, 56, 8, 19, 230]]


def full_value(model, tokens):
    """V of the state ending at the last token, from one plain forward pass with no cache and no padding."""
    ids = torch.tensor([tokens])
    return model(ids, torch.ones_like(ids))[0, -1].item()


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 0.0), (torch.bfloat16, 0.05, 0.05)])
def test_cached_candidates_equal_full_recompute(tiny_model_dir, dtype, atol, rtol):
    # bfloat16 is the GPU default: the additive mask is built in the backbone's dtype. Its rounding (8 bits of
    # mantissa) differs between the padded batch and the single rows, by a few % of values of size ~5 here.
    model = random_value_model(tiny_model_dir).to(dtype)
    model.head.float()
    scorer = CandidateScorer(model)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    generator = torch.Generator().manual_seed(1)
    prefixes = [list(p) for p in PROMPTS]
    new_ids, new_mask = ids, mask
    for step in range(3):  # the prompt, then two appended tokens
        cands = torch.randint(0, 250, (3, 6), generator=generator)
        got = scorer.score(tokens(new_ids, new_mask), cands)
        expected = torch.tensor([[full_value(model, prefixes[b] + [int(c)]) for c in cands[b]] for b in range(3)])
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
        chosen = cands[:, step : step + 1]
        for b in range(3):
            prefixes[b].append(int(chosen[b]))
        new_ids, new_mask = chosen, torch.ones_like(chosen)


def test_batch_rows_equal_single_rows(tiny_model_dir):
    model = random_value_model(tiny_model_dir, seed=3)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cands = torch.arange(30).view(3, 10) + 50
    batched = CandidateScorer(model).score(tokens(ids, mask), cands)
    for b, prompt in enumerate(PROMPTS):
        single = CandidateScorer(model).score(tokens(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long)), cands[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-4, rtol=0)


def test_save_and_reload_gives_same_values(tiny_model_dir, tmp_path):
    model = random_value_model(tiny_model_dir, seed=5)
    tokenizer = load_tokenizer(tiny_model_dir)
    model.save_pretrained(tmp_path / "v", tokenizer=tokenizer)
    reloaded = ValueModel.from_pretrained(tmp_path / "v")  # LoRA merged into the backbone
    ids = torch.tensor([PROMPTS[2]])
    torch.testing.assert_close(reloaded(ids, torch.ones_like(ids)), model(ids, torch.ones_like(ids)), atol=1e-4, rtol=0)
    check_same_tokenizer(tokenizer, load_value_tokenizer(tmp_path / "v"), "v")  # no error


def test_different_tokenizer_is_refused(tiny_model_dir, other_tokenizer_model_dir):
    with pytest.raises(VasError, match="different tokenizer"):
        check_same_tokenizer(load_tokenizer(tiny_model_dir), load_tokenizer(other_tokenizer_model_dir), "other")


def test_not_a_value_model_directory(tmp_path):
    with pytest.raises(VasError, match="is not a value model folder"):
        ValueModel.from_pretrained(tmp_path)
    with pytest.raises(VasError, match="'nowhere' does not exist"):
        ValueModel.from_pretrained("nowhere")


def test_layer_truncated_value_model_reads_the_first_layers(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "deep", layers=4)
    model = random_value_model(model_dir, seed=7, num_layers=1)
    ids = torch.tensor([PROMPTS[0]])
    # Independently: the full 4-layer body's hidden state after layer 1, through the final norm, LoRA merged.
    full = AutoModel.from_pretrained(model_dir)
    merged = model.backbone.merge_and_unload() if hasattr(model.backbone, "merge_and_unload") else model.backbone
    full.layers[0].load_state_dict(merged.layers[0].state_dict())
    hidden = full(ids, output_hidden_states=True).hidden_states[1]
    expected = model.head(full.norm(hidden)).squeeze(-1)
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), expected, atol=1e-5, rtol=0)
    model = random_value_model(model_dir, seed=7, num_layers=1)  # merge_and_unload above changed the first
    model.save_pretrained(tmp_path / "v")
    reloaded = ValueModel.from_pretrained(tmp_path / "v")
    assert len(reloaded.backbone.layers) == 1
    torch.testing.assert_close(reloaded(ids, torch.ones_like(ids)), expected, atol=1e-5, rtol=0)
    with pytest.raises(VasError, match="has 4 layers: keep 1 to 4 of them, got 5"):
        ValueModel.create(model_dir, num_layers=5)


def test_a_value_model_retrained_in_place_gets_another_fingerprint(tmp_path, tiny_model_dir):
    """Resumed jobs store each value model's fingerprint: the same files give the same one, a value model
    retrained into the same folder another, and a refused resume names it."""
    from helpers import random_value_model

    from vas.resume import option_names
    from vas.value.model import fingerprint

    random_value_model(tiny_model_dir, seed=1).save_pretrained(tmp_path / "v")
    first = fingerprint(tmp_path / "v")
    assert fingerprint(tmp_path / "v") == first and len(first) == 16
    random_value_model(tiny_model_dir, seed=1).save_pretrained(tmp_path / "same")
    assert fingerprint(tmp_path / "same") == first  # the folder's name does not count, its content does
    random_value_model(tiny_model_dir, seed=2).save_pretrained(tmp_path / "v")
    assert fingerprint(tmp_path / "v") != first
    assert option_names(["value_sha256"]) == ["the value models (retrained since)"]
