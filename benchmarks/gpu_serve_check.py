"""`vas serve` on a GPU, against the project's own decoding loop: steered greedy answers token for token.

    python benchmarks/gpu_serve_check.py [--out FILE]

Starts `vas serve` on 127.0.0.1 with the embedded SmolLM2 and two value models (random LoRA and heads on its
first 8 layers: a `last` and a `distributional` head), float32 on both sides, and asks it for greedy
completions of 4 prompts under 4 steerings (plain, each value model alone, a mix with soft values). The own loop
(:func:`vas.decoding.loop.sample`, same device) decodes the same requests. A pair passes when the token ids
are equal or, where they part, the own loop's two best steered tokens at that step lie within
:data:`TIE_NATS` of each other (a near tie that kernels of another rounding may break the other way; the
answers then differ by design after it). Writes the vLLM version, the model runner vLLM chose, each pair's
verdict and the time of each phase as JSON; exits 1 if any pair fails or the runner is not V2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch

from vas.decoding.guidance import base_logprobs
from vas.decoding.loop import Steering, sample, steer
from vas.decoding.rules import REQUEST, parse_weights
from vas.config import EMBEDDED_MODEL
from vas.models import embedded_model_dir, load_policy, load_tokenizer
from vas.policy.local import LocalPolicy
from vas.prompts import encode_prompts
from vas.serving.server import serve_in_background
from vas.value.model import ValueModel
from vas.value.scorers import CandidateScorer

TIE_NATS = 0.05
MAX_TOKENS = 24
PROMPTS = ["hi", "Tell me about cats.", "What should I cook tonight?", "Write a short poem about the sea."]
STEERINGS = {"plain": None, "last": {"vas_beta": 4.0, "vas_values": "last"},
             "distributional": {"vas_beta": -3.0, "vas_top_k": 5, "vas_values": "dist"},
             "mix-soft": {"vas_beta": 6.0, "vas_values": "last=1,dist=0.5", "vas_soft": True}}


def value_models(folder: Path) -> dict[str, Path]:
    for seed, (name, head) in enumerate({"last": {}, "dist": {"head": "distributional", "bins": 11,
                                                               "support": (-1.0, 1.0)}}.items(), start=1):
        torch.manual_seed(seed)
        model = ValueModel.create(str(embedded_model_dir()), num_layers=8, init_value=0.1, **head)
        with torch.no_grad():
            torch.nn.init.normal_(model.head.weight, std=1.0)
            for parameter_name, parameter in model.backbone.named_parameters():
                if "lora_B" in parameter_name:
                    torch.nn.init.normal_(parameter, std=0.2)
        model.save_pretrained(folder / name)
    return {"last": folder / "last", "dist": folder / "dist"}


def own(policy, models, prompt: list[int], xargs: dict | None) -> tuple[list[int], list[float]]:
    """The own loop's greedy token ids (:func:`vas.decoding.loop.sample`) and, replayed step by step, the gap
    between its two best steered log-probs at each step."""
    steering = Steering()
    if xargs:
        weights = dict(zip(models, parse_weights(xargs["vas_values"], list(models), REQUEST)))
        steering = Steering([models[n] for n in weights], list(weights.values()),
                            beta=xargs["vas_beta"], top_k=xargs.get("vas_top_k", 10), soft=xargs.get("vas_soft", False))
    ids = sample(policy, [prompt], steering, greedy=True, temperature=1.0, max_new_tokens=MAX_TOKENS).token_ids[0]

    async def replay() -> list[float]:
        rollout = policy.start([prompt], MAX_TOKENS)
        scorers = [CandidateScorer(m) for m in steering.value_models]
        rows = steering.rows(1)
        active, gaps = torch.ones(1, dtype=torch.bool), []
        for token in ids:
            base = base_logprobs((await rollout.next_logprobs(steering.top_k)).float(), 1.0)
            logp = steer(rows, scorers, rollout, base, active, top_k=steering.top_k)
            top = logp[0].topk(2).values
            gaps.append(float(top[0] - top[1]))
            rollout.advance(torch.tensor([token], device=base.device), active)
        return gaps

    return ids, asyncio.run(replay())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-serve-check.json"))
    args = parser.parse_args()
    import vllm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"vllm": vllm.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name() if
              device == "cuda" else "cpu", "tie_nats": TIE_NATS, "pairs": [], "seconds": {}}
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folders = value_models(Path(tmp))
        start = time.perf_counter()
        with open(Path(tmp) / "server.log", "w+") as log, serve_in_background(
                ["--dtype", "float32", "--value-dtype", "float32", "--max-model-len", "1024",
                 "--gpu-memory-utilization", "0.6",
                 *(arg for name, path in folders.items() for arg in ("--value", f"{name}={path}"))], log=log,
                startup_timeout=900) as url:
            report["seconds"]["server_start"] = time.perf_counter() - start
            start = time.perf_counter()
            served = {}
            for prompt in PROMPTS:
                for label, xargs in STEERINGS.items():
                    body = {"model": EMBEDDED_MODEL, "prompt": encode_prompts(tokenizer, [prompt])[0],
                            "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                            **({"vllm_xargs": xargs} if xargs else {})}
                    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
                    answer.raise_for_status()
                    served[prompt, label] = answer.json()["choices"][0]["token_ids"]
            report["seconds"]["served"] = time.perf_counter() - start
            log.seek(0)
            text = log.read()
            runner = re.search(r"VAS on vLLM's (V\d) model runner", text)
            report["runner"] = runner.group(1) if runner else None
        start = time.perf_counter()
        policy = LocalPolicy(load_policy(EMBEDDED_MODEL, device=device, dtype=torch.float32), tokenizer)
        models = {name: ValueModel.from_pretrained(path, device=device, dtype=torch.float32) for name, path in folders.items()}
        for (prompt, label), theirs in served.items():
            mine, gaps = own(policy, models, encode_prompts(tokenizer, [prompt])[0], STEERINGS[label])
            parted = next((t for t, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
            if parted is None and len(mine) != len(theirs):
                parted = min(len(mine), len(theirs))
            ok = parted is None or (parted < len(gaps) and gaps[parted] < TIE_NATS)
            report["pairs"].append({"prompt": prompt, "steering": label, "equal": parted is None, "parted_at": parted,
                                    "gap_nats": None if parted is None or parted >= len(gaps) else gaps[parted],
                                    "pass": ok, "served": theirs, "own": mine})
        report["seconds"]["own_loop"] = time.perf_counter() - start
    report["passed"] = all(p["pass"] for p in report["pairs"]) and report["runner"] == "V2"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    equal = sum(p["equal"] for p in report["pairs"])
    print(f"vLLM {report['vllm']}, {report['runner']} model runner: {equal}/{len(report['pairs'])} steered greedy "
          f"answers equal the own loop's token for token; {'all pass' if report['passed'] else 'FAILED'} (near "
          f"ties < {TIE_NATS} nats allowed; the V2 runner expected) → {args.out}")
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
