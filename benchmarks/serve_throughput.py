"""Tokens per second of VAS served by `vas serve` (vLLM), against plain vLLM sampling, in one run.

    python benchmarks/serve_throughput.py [--tokens 32] [--concurrency 1 8 32] [--out FILE]

Starts `vas serve` on 127.0.0.1 with the embedded SmolLM2 (float32) and two value models on its first 8 of 30
layers (about a quarter of the depth; random LoRA and head, which cost what trained ones cost), one with the
``last`` head (k + 1 tokens per row per step) and one with the ``next`` head (one token per row per step), then
sends the same chitchat prompts at each concurrency c (2·c requests, at most c in flight, τ = 0.7, a seed per
request, ``max_tokens`` fixed and ``ignore_eos`` so every request generates the same number of tokens):

- plain vLLM: requests without ``vas_*`` fields (the processor leaves them untouched and does no work);
- VAS, per head: ``vas_beta`` = 2, ``vas_top_k`` = 10, that value model alone.

Tokens/s counts generated tokens over the wall time of each configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch

from vas.config import EMBEDDED_MODEL
from vas.models import embedded_model_dir
from vas.prompts import load_prompts
from vas.serving.server import serve_in_background
from vas.value.model import ValueModel

HEADS = ("last", "next")


async def measure(url: str, prompts: list[str], concurrency: int, tokens: int, xargs: dict | None) -> dict:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=1800) as client:
        async def one(i: int, prompt: str) -> int:
            body = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0.7, "seed": i, "ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
            async with gate:
                answer = await client.post(f"{url}/v1/chat/completions", json=body)
            answer.raise_for_status()
            return answer.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        generated = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        seconds = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": sum(generated), "seconds": seconds,
            "tokens_per_s": sum(generated) / seconds, "requests_per_s": len(prompts) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        for head in HEADS:
            value = ValueModel.create(str(embedded_model_dir()), num_layers=8, head=head)
            with torch.no_grad():
                for weight in (p for p in value.head.parameters() if p.dim() == 2):
                    torch.nn.init.normal_(weight, std=0.3 if head == "last" else 0.05)
            value.save_pretrained(Path(tmp) / head)
            del value
        rows = []
        values = [arg for head in HEADS for arg in ("--value", f"{head}={Path(tmp) / head}")]
        with open(Path(tmp) / "server.log", "w") as log, serve_in_background(
                ["--dtype", "float32", "--value-dtype", "float32", *values, "--max-model-len", "1024"], log=log) as url:
            for head in HEADS:  # warm-up
                asyncio.run(measure(url, load_prompts("chitchat", limit=2), 2, 4, {"vas_beta": 2.0, "vas_values": head}))
            for c in args.concurrency:
                prompts = load_prompts("chitchat", limit=2 * c)
                row = {"concurrency": c, "plain": asyncio.run(measure(url, prompts, c, args.tokens, None))}
                for head in HEADS:
                    row[head] = asyncio.run(measure(url, prompts, c, args.tokens,
                                                    {"vas_beta": 2.0, "vas_top_k": 10, "vas_values": head}))
                    row[f"{head}_ratio"] = row[head]["tokens_per_s"] / row["plain"]["tokens_per_s"]
                rows.append(row)
                print(f"concurrency {c:>2}: plain vLLM {row['plain']['tokens_per_s']:7.1f} tokens/s; "
                      + "; ".join(f"VAS, {head} head {row[head]['tokens_per_s']:7.1f} tokens/s "
                                  f"({row[f'{head}_ratio']:.2f}× plain)" for head in HEADS), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                    "tokens": args.tokens, "value_model_layers": 8, "top_k": 10, "heads": HEADS, "rows": rows}, indent=2))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
