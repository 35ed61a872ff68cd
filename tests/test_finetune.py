"""Fine-tuned baselines (vas.finetune): DPO's preference pairs by hand, the exact KL of a fine-tuned policy
against π0 (0 for an untrained adapter, a hand computation for a perturbed one), and `vas finetune` →
`vas evaluate --policy` from the command line, with bad input."""

import json

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_cli import vas

from vas.config import FinetuneConfig
from vas.decoding.loop import sample
from vas.errors import VasError
from vas.finetune import finetune, preference_pairs
from vas.models import load_policy, load_tokenizer
from vas.policy.local import LocalPolicy
from vas.prompts import encode_prompts


def test_preference_pairs_by_hand(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    prompts = [tok("hello")["input_ids"], tok("what a day")["input_ids"], tok("bad news")["input_ids"]]
    responses = [tok(w)["input_ids"] for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    # prompt 0: rewards 0.2, 0.9, −0.5, 0.9 → chosen the first 0.9 (row 1), rejected −0.5 (row 2)
    # prompt 1: 0.3, 0.3 → a tie, no pair; prompt 2: −1, 0.5 → chosen row 7, rejected row 6
    data = datasets.Dataset.from_dict({
        "prompt_ids": [prompts[0]] * 4 + [prompts[1]] * 2 + [prompts[2]] * 2,
        "response_ids": responses,
        "reward": [0.2, 0.9, -0.5, 0.9, 0.3, 0.3, -1.0, 0.5],
        "prompt_index": [0, 0, 0, 0, 1, 1, 2, 2],
    })
    pairs = preference_pairs(data, tok)
    assert pairs["prompt_index"] == [0, 2]
    assert pairs["prompt"] == ["hello", "bad news"]
    assert pairs["chosen"] == ["b", "h"] and pairs["rejected"] == ["c", "g"]
    assert pairs["chosen_reward"] == [0.9, 0.5] and pairs["rejected_reward"] == [-0.5, -1.0]
    # without prompt_index, rows are grouped by their prompt ids: the same pairs
    assert preference_pairs(data.remove_columns("prompt_index"), tok)["chosen"] == ["b", "h"]


def tuned_copy(model_dir, scale: float):
    """π0 with a LoRA adapter merged: B = 0 (never trained) for scale 0, else random B × scale."""
    torch.manual_seed(1)
    peft = get_peft_model(load_policy(model_dir), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)
    return peft.merge_and_unload().eval()


def test_an_untrained_adapter_has_kl_zero_and_samples_as_pi0(tiny_model_dir):
    tok, base = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    prompts = ["hello", "what a wonderful day, i love it"]
    tuned = LocalPolicy(base, tok, tuned=tuned_copy(tiny_model_dir, 0.0))
    out = sample(tuned, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert out.kl.tolist() == [0.0, 0.0]
    plain = sample(LocalPolicy(base, tok), prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert out.token_ids == plain.token_ids


def test_the_kl_of_a_perturbed_policy_matches_a_hand_computation(tiny_model_dir):
    tok, base = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    theta = tuned_copy(tiny_model_dir, 0.5)
    prompts, tau = ["hello", "what a wonderful day, i love it"], 0.7  # different lengths: left padding
    out = sample(LocalPolicy(base, tok, tuned=theta), prompts, temperature=tau, max_new_tokens=4,
                 generator=torch.Generator().manual_seed(0))
    assert float(out.kl.min()) > 1e-3  # the perturbation moved π_θ away from π0
    for row, ids in enumerate(encode_prompts(tok, prompts)):
        generated = out.token_ids[row]
        full = torch.tensor([ids + generated])
        with torch.no_grad():  # whole sequences, one row, no cache: each position's next-token distribution
            log_theta = torch.log_softmax(theta(full).logits[0].double() / tau, dim=-1)
            log_pi0 = torch.log_softmax(base(full).logits[0].double() / tau, dim=-1)
        steps = range(len(ids) - 1, len(ids) - 1 + len(generated))
        kl = sum(float((log_theta[t].exp() * (log_theta[t] - log_pi0[t])).sum()) for t in steps)
        assert float(out.kl[row]) == pytest.approx(kl, rel=1e-3, abs=1e-5)
        # the tokens were drawn from π_θ: their log-probabilities are π_θ's, and the base ones π0's
        assert out.logprobs[row] == pytest.approx([float(log_theta[t, x]) for t, x in zip(steps, generated)], abs=1e-4)
        assert out.base_logprobs[row] == pytest.approx([float(log_pi0[t, x]) for t, x in zip(steps, generated)], abs=1e-4)


def test_value_models_with_a_fine_tuned_policy_are_refused(tiny_model_dir):
    from helpers import random_value_model

    from vas.decoding.loop import Steering

    tok, base = load_tokenizer(tiny_model_dir), load_policy(tiny_model_dir)
    with pytest.raises(VasError, match="fine-tuned policy is sampled as it is"):
        sample(LocalPolicy(base, tok, tuned=tuned_copy(tiny_model_dir, 0.0)), ["hi"],
               Steering([random_value_model(tiny_model_dir)], beta=1.0), max_new_tokens=2)


@pytest.fixture(scope="module")
def collected(tiny_model_dir, tmp_path_factory):
    """π0's responses to 4 prompts × 2, scored by their word count (which varies for the tiny model's text)."""
    out = tmp_path_factory.mktemp("data") / "d"
    r = vas("collect", "--quiet", "--out", out, "--base-model", tiny_model_dir, "--limit", 4, "--samples-per-prompt", 2,
            "--max-new-tokens", 6, "--reward", "verbosity")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_finetune_then_evaluate_from_the_command_line(tiny_model_dir, collected, tmp_path):
    data = datasets.load_from_disk(str(collected))
    pairs = preference_pairs(data, load_tokenizer(tiny_model_dir))
    assert len(pairs) > 0
    r = vas("finetune", "--quiet", "--method", "dpo", "--data", collected, "--out", tmp_path / "dpo", "--epochs", 1,
            "--batch-size", 2, "--kl-coef", 0.2)
    assert r.returncode == 0, r.stderr
    assert f"DPO KL 0.2: {-(-len(pairs) // 2)} steps" in r.stdout
    info = json.loads((tmp_path / "dpo" / "vas_finetune.json").read_text())
    assert info["training"]["pairs"] == len(pairs) and info["training"]["samples_read"] == 2 * len(pairs)
    assert (tmp_path / "dpo" / "adapter_config.json").is_file()
    assert not (tmp_path / "dpo.checkpoints").exists()
    # online: 4 prompts × 2 responses per epoch, 2 epochs, 2 per step → 8 steps, 16 responses drawn; a snapshot halfway
    r = vas("finetune", "--quiet", "--method", "rloo", "--data", collected, "--out", tmp_path / "rloo", "--batch-size", 2,
            "--max-new-tokens", 4, "--snapshots", 2)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "rloo" / "vas_finetune.json").read_text())
    assert info["training"]["steps"] == 8 and info["training"]["samples_drawn"] == 16 and info["reward"] == "verbosity"
    half = json.loads((tmp_path / "rloo" / "snapshots" / "step-4" / "vas_finetune.json").read_text())
    assert half["training"]["samples_drawn"] == 8 and half["snapshot"]

    r = vas("evaluate", "--quiet", "--base-model", tiny_model_dir, "--policy", tmp_path / "dpo", "--policy",
            tmp_path / "rloo" / "snapshots" / "step-4", "--out", tmp_path / "e", "--limit", 2, "--best-of", "1,2",
            "--max-new-tokens", 4, "--reward", "verbosity")
    assert r.returncode == 0, r.stderr
    assert "DPO KL 0.2: trained in" in r.stdout and "RLOO KL 0.1, step 4" in r.stdout
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["vas"] == [] and [f["name"] for f in report["finetuned"]] == ["DPO KL 0.2", "RLOO KL 0.1, step 4"]
    rows = [json.loads(line) for line in (tmp_path / "e" / "responses.jsonl").read_text().splitlines()]
    for entry in report["finetuned"]:  # the report's numbers, recounted from the saved responses
        own = [row for row in rows if row["method"] == "finetuned" and row["policy"] == entry["name"]]
        assert len(own) == 2
        assert entry["reward"] == pytest.approx(sum(row["reward"] for row in own) / 2)
        assert entry["kl"] == pytest.approx(sum(row["kl"] for row in own) / 2) and entry["kl"] >= 0
        assert entry["policy_tokens"] is not None and entry["training"]["seconds"] > 0


def test_finetune_bad_input(tiny_model_dir, collected, tmp_path):
    empty = tmp_path / "empty"
    datasets.load_from_disk(str(collected)).select([]).save_to_disk(str(empty))
    (empty / "vas_collect.json").write_text((collected / "vas_collect.json").read_text())
    tied = tmp_path / "tied"
    data = datasets.load_from_disk(str(collected))
    data.remove_columns("reward").add_column("reward", [0.5] * len(data)).save_to_disk(str(tied))
    (tied / "vas_collect.json").write_text((collected / "vas_collect.json").read_text())
    cases = {
        "unknown method": (["--method", "sft", "--data", collected], "--method must be one of dpo, rloo, grpo"),
        "ppo": (["--method", "ppo", "--data", collected], "TRL's PPO needs a reward model"),
        "empty data": (["--data", empty], "holds no responses"),
        "no pairs": (["--data", tied], "no preference pair"),
        "missing data": (["--data", tmp_path / "nope"], "does not exist"),
        "bad kl": (["--data", collected, "--kl-coef", 0], "--kl-coef must be a finite number > 0"),
        "batch not a multiple": (["--method", "rloo", "--data", collected, "--batch-size", 3], "must be a multiple"),
        "bad reward": (["--method", "rloo", "--data", collected, "--reward", "nonsense"], "nonsense"),
        "huge batch": (["--data", collected, "--batch-size", 10**15], "--batch-size must be at most"),
    }
    for case, (args, message) in cases.items():
        r = vas("finetune", "--quiet", "--out", tmp_path / "o", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("vas: error: ") and message in lines[0], (case, r.stderr)
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists(), case
    # evaluate: a folder that is not a fine-tuned policy, nothing to compare
    r = vas("evaluate", "--quiet", "--base-model", tiny_model_dir, "--policy", collected, "--out", tmp_path / "e")
    assert r.returncode == 2 and "is not a fine-tuned policy" in r.stderr
    r = vas("evaluate", "--quiet", "--base-model", tiny_model_dir, "--out", tmp_path / "e")
    assert r.returncode == 2 and "give --value and/or --policy" in r.stderr
    damaged = tmp_path / "damaged"  # its metadata without the adapter's weights
    damaged.mkdir()
    (damaged / "vas_finetune.json").write_text(json.dumps({"method": "dpo", "kl_coef": 0.1, "base_model": tiny_model_dir,
                                                           "training": {}}))
    r = vas("evaluate", "--quiet", "--base-model", tiny_model_dir, "--policy", damaged, "--out", tmp_path / "e")
    assert r.returncode == 2 and "damaged fine-tuned policy (adapter_config.json, adapter_model.safetensors missing)" in r.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_finetune_resumes_an_interrupted_run(tiny_model_dir, collected, tmp_path, monkeypatch):
    """A run stopped after its first checkpoint continues from it and ends as an uninterrupted run does."""
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    data = datasets.load_from_disk(str(collected))
    config = FinetuneConfig(method="dpo", epochs=1, batch_size=1, save_steps=1)
    settings = json.loads((collected / "vas_collect.json").read_text())
    common = dict(base_model=tiny_model_dir, reward_spec="verbosity", data_settings=settings, progress=False)
    import vas.value.train as module  # where finetune() takes its progress callbacks from

    original = module.show_progress

    def stopping(trainer, *args):
        trainer.add_callback(Stop())
        return original(trainer, *args)

    with monkeypatch.context() as patch:
        patch.setattr(module, "show_progress", stopping)
        with pytest.raises(KeyboardInterrupt):
            finetune(data, tmp_path / "a", config, **common)
    assert (tmp_path / "a.checkpoints" / "checkpoint-1").is_dir() and not (tmp_path / "a").exists()
    with pytest.raises(VasError, match="other settings"):
        finetune(data, tmp_path / "a", FinetuneConfig(method="dpo", epochs=1, batch_size=1, save_steps=1, kl_coef=0.5), **common)
    resumed = finetune(data, tmp_path / "a", config, **common)
    straight = finetune(data, tmp_path / "b", config, **common)
    assert resumed["training"]["steps"] == straight["training"]["steps"] == len(preference_pairs(data, load_tokenizer(tiny_model_dir)))
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
