"""Training and collection throughput, each against the plain Hugging Face way of doing the same work.

    python benchmarks/throughput.py [--device auto] [--out benchmarks/results/throughput-cpu.json]

- Training: ``vas train``'s step (value model = backbone + LoRA r=32 + head, TD(λ) loss, via
  :func:`vas.value.train.train_value_model`) against a plain LoRA (r=32, all linear layers) causal-LM fine-tuning
  step of the same backbone in the same ``Trainer``, on the same rows (chitchat prompts ⊕ 40-token
  responses), same batch size and precision. Tokens/s counts non-padding tokens; the first steps are
  warm-up and not timed.
- Collection: :func:`vas.collect.collect` (our sampling loop, reward, shards written atomically) against
  batched ``model.generate`` + decoding + the same reward, on the same prompts, batch size and token limit.
  Responses end at EOS, so lengths differ by chance between the two; tokens/s counts generated tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from vas.collect import collect
from vas.config import EMBEDDED_MODEL, CollectConfig, TrainConfig
from vas.models import (
    eos_token_ids,
    left_pad,
    load_policy,
    load_tokenizer,
    resolve_device,
    resolve_model,
)
from vas.prompts import encode_prompts, load_prompts
from vas.rewards import load_reward, score
from vas.policy.local import LocalPolicy
from vas.value.train import train_value_model

WARMUP_STEPS = 2


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step after the warm-up ones."""

    def __init__(self):
        self.seconds, self.steps, self.start = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > WARMUP_STEPS:
            self.seconds += time.perf_counter() - self.start
            self.steps += 1


def training_rows(tokenizer, n: int, response_tokens: int) -> datasets.Dataset:
    prompts = load_prompts("chitchat", limit=n)
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(100, len(tokenizer) - 100, (n, response_tokens), generator=g).tolist()
    return datasets.Dataset.from_dict({
        "prompt_ids": encode_prompts(tokenizer, prompts), "response_ids": responses,
        "reward": torch.rand(n, generator=g).tolist(), "prompt_index": list(range(n)),
    })


def lm_collator(pad_id: int):
    def collate(rows):
        seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return collate


def bench_training(device, rows: datasets.Dataset, batch: int, tmp: Path) -> dict:
    # non-padding tokens in an average step (the Trainer shuffles the rows)
    tokens_per_step = batch * sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows) / len(rows)
    steps = len(rows) // batch
    tokenizer = load_tokenizer(EMBEDDED_MODEL)

    value_timer = StepTimer()
    train_value_model(rows, tmp / "value", TrainConfig(backbone=EMBEDDED_MODEL, batch_size=batch, lora_rank=32, lora_alpha=32,
                                                      val_fraction=0.0),
                      tokenizer=tokenizer, device=device, progress=False, callbacks=[value_timer])

    model = AutoModelForCausalLM.from_pretrained(resolve_model(EMBEDDED_MODEL)).to(device)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    lm_timer = StepTimer()
    args = TrainingArguments(output_dir=str(tmp / "lm"), per_device_train_batch_size=batch, num_train_epochs=1,
                             learning_rate=1e-4, save_strategy="no", report_to=[], disable_tqdm=True,
                             use_cpu=device.type == "cpu", remove_unused_columns=False, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows, data_collator=lm_collator(tokenizer.pad_token_id),
            callbacks=[lm_timer]).train()
    value_tps = tokens_per_step * value_timer.steps / value_timer.seconds
    lm_tps = tokens_per_step * lm_timer.steps / lm_timer.seconds
    return {"batch": batch, "steps": steps, "timed_steps": value_timer.steps, "lora_lm_timed_steps": lm_timer.steps,
            "tokens_per_step": tokens_per_step,
            "value_tokens_per_second": value_tps, "lora_lm_tokens_per_second": lm_tps,
            "value_over_lora_lm_time_per_token (target <= 1.3)": lm_tps / value_tps}


def bench_collection(device, n: int, batch: int, max_new: int, tmp: Path) -> dict:
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    policy = load_policy(EMBEDDED_MODEL, device=device)
    prompts = load_prompts("chitchat", start=100, limit=n)
    reward = load_reward("positivity")
    collect(LocalPolicy(policy, tokenizer), prompts[:batch], reward, tmp / "warm",
            CollectConfig(samples_per_prompt=1, batch_size=batch, max_new_tokens=4), progress=False)

    start = time.perf_counter()
    data = collect(LocalPolicy(policy, tokenizer), prompts, reward, tmp / "collected",
                   CollectConfig(samples_per_prompt=1, batch_size=batch, max_new_tokens=max_new), progress=False)
    ours = time.perf_counter() - start
    ours_tokens = sum(len(r) for r in data["response_ids"])

    ids = encode_prompts(tokenizer, prompts)
    eos = eos_token_ids(policy, tokenizer)
    warm_ids, warm_mask = left_pad(ids[:batch], tokenizer.pad_token_id)
    policy.generate(warm_ids.to(device), attention_mask=warm_mask.to(device), do_sample=True, max_new_tokens=4,
                    pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    hf_tokens = 0
    for i in range(0, n, batch):
        chunk_ids, mask = left_pad(ids[i : i + batch], tokenizer.pad_token_id)
        out = policy.generate(chunk_ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=0.7,
                              top_k=0, top_p=1.0, max_new_tokens=max_new, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id)
        new = out[:, chunk_ids.shape[1]:].cpu()
        ended = torch.isin(new, torch.tensor(eos))
        lengths = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full((len(new),), new.shape[1]))
        hf_tokens += int(lengths.sum())
        texts = tokenizer.batch_decode([row[:length] for row, length in zip(new.tolist(), lengths.tolist(), strict=True)],
                                       skip_special_tokens=True)
        score(reward, prompts[i : i + batch], texts)
    hf = time.perf_counter() - start
    return {"prompts": n, "batch": batch, "max_new_tokens": max_new,
            "collect_seconds": ours, "collect_tokens": ours_tokens, "collect_tokens_per_second": ours_tokens / ours,
            "generate_reward_seconds": hf, "generate_tokens": hf_tokens, "generate_tokens_per_second": hf_tokens / hf,
            "collect_over_generate_time_per_token (target <= 1.2)": (ours / ours_tokens) / (hf / hf_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = resolve_device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"throughput-{device.type}{'-quick' if args.quick else ''}.json"
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        rows = training_rows(tokenizer, 24 if args.quick else 160, 40)
        training = bench_training(device, rows, 4 if args.quick else 16, Path(tmp))
        collection = bench_collection(device, 8 if args.quick else 64, 4 if args.quick else 16, 8 if args.quick else 40, Path(tmp))
    report = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "training": training, "collection": collection,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"training": training, "collection": collection}, indent=2))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
