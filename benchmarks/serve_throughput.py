"""Tokens per second of VAS served by `vas serve` (vLLM), against plain vLLM sampling, in one run.

    python benchmarks/serve_throughput.py [--tokens 32] [--concurrency 1 8 32] [--out FILE]

Starts `vas serve` on 127.0.0.1 with the embedded SmolLM2 (float32) and one value model on its first 8 of 30
layers (about a quarter of the depth; random LoRA and head, which cost what trained ones cost), then sends
the same chitchat prompts at each concurrency c (2·c requests, at most c in flight, τ = 0.7, a seed per
request, ``max_tokens`` fixed and ``ignore_eos`` so every request generates the same number of tokens):

- plain vLLM: requests without ``vas_*`` fields (the processor leaves them untouched and does no work);
- VAS: ``vas_beta`` = 2, ``vas_top_k`` = 10, the one value model.

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

from vas.models import EMBEDDED_MODEL, embedded_model_dir
from vas.prompts import load_prompts
from vas.serving.server import serve_in_background
from vas.value.model import ValueModel


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
        value = ValueModel.create(str(embedded_model_dir()), num_layers=8)
        torch.nn.init.normal_(value.head.weight, std=0.3)
        value.save_pretrained(Path(tmp) / "value")
        del value
        rows = []
        with open(Path(tmp) / "server.log", "w") as log, serve_in_background(
                ["--dtype", "float32", "--value-dtype", "float32", "--value", f"v={Path(tmp) / 'value'}",
                 "--max-model-len", "1024"], log=log) as url:
            asyncio.run(measure(url, load_prompts("chitchat", limit=2), 2, 4, {"vas_beta": 2.0}))  # warm-up
            for c in args.concurrency:
                prompts = load_prompts("chitchat", limit=2 * c)
                plain = asyncio.run(measure(url, prompts, c, args.tokens, None))
                vas = asyncio.run(measure(url, prompts, c, args.tokens, {"vas_beta": 2.0, "vas_top_k": 10, "vas_values": "v"}))
                rows.append({"concurrency": c, "plain": plain, "vas": vas, "ratio": vas["tokens_per_s"] / plain["tokens_per_s"]})
                print(f"concurrency {c:>2}: plain vLLM {plain['tokens_per_s']:7.1f} tokens/s, VAS {vas['tokens_per_s']:7.1f} "
                      f"tokens/s ({vas['requests_per_s']:.2f} requests/s), VAS/plain {rows[-1]['ratio']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                    "tokens": args.tokens, "value_model_layers": 8, "top_k": 10, "rows": rows}, indent=2))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
