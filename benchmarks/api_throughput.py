"""Tokens per second of steering through an OpenAI-compatible API, against plain API sampling, in one run.

    python benchmarks/api_throughput.py [--policy smollm2-135m-instruct] [--prompts 8] [--tokens 32] [--out FILE]

Starts llama-cpp-python's server on 127.0.0.1 with π0's GGUF (the embedded SmolLM2, with its chat template,
or gemma-3-270m, raw prompts) and measures, on the same chitchat prompts and token limit:

- plain API sampling: one request per response (the server generates every token), τ = 0.7;
- token by token, β = 0: one request per token with its top-k, no value model (the cost of the protocol);
- VAS through the API: the same plus a value model (SmolLM2 backbone, first 8 of 30 layers, LoRA, float32,
  its own KV cache) scoring the k candidate strings at every step.

Each token-by-token configuration runs at concurrency 1 and 4, and at concurrency 1 with each next token
streamed (``Endpoint.stream``: llama-cpp-python then computes log-probabilities for that token only). The server evaluates one request at a time,
so concurrency overlaps only the client's work (value model, HTTP) with the server's. Tokens/s counts
generated tokens (the server's, or requests made).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from vas.policy.api import (
    LLAMA_CPP_UNTRUNCATED,
    ApiPolicy,
    Endpoint,
    chat_template,
)
from vas.config import EMBEDDED_MODEL
from vas.models import gguf_file, load_tokenizer
from vas.processes import llama_cpp_server
from vas.prompts import load_prompts
from vas.decoding.loop import Steering
from vas.decoding.batches import generate
from vas.value.model import ValueModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=EMBEDDED_MODEL, help="π0: a name vas.models.gguf_file knows, or a .gguf")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/api-cpu.json"))
    args = parser.parse_args()

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    prompts = load_prompts("chitchat", start=2000, limit=args.prompts)
    torch.manual_seed(0)
    value = ValueModel.create(EMBEDDED_MODEL, lora_rank=16, num_layers=8).eval()
    results = []
    template = chat_template(tokenizer) if args.policy == EMBEDDED_MODEL else None
    with llama_cpp_server(gguf_file(args.policy), n_ctx=4096) as url:
        def policy(stream=False):
            return ApiPolicy(Endpoint(url, args.policy, extra_body=LLAMA_CPP_UNTRUNCATED, stream=stream), template)

        async def plain(concurrency):
            p, gate = policy(), asyncio.Semaphore(concurrency)

            async def one(i, prompt):
                async with gate:
                    return await p.sample(prompt, max_new_tokens=args.tokens, temperature=0.7, seed=i)
            try:
                return await asyncio.gather(*(one(i, q) for i, q in enumerate(prompts)))
            finally:
                await p.close()

        for concurrency in (1, 4):
            start = time.perf_counter()
            completions = asyncio.run(plain(concurrency))
            seconds = time.perf_counter() - start
            tokens = sum(c.tokens for c in completions)
            results.append({"method": "plain API sampling (one request per response)", "concurrency": concurrency,
                            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
            print(results[-1], flush=True)
        configurations = [(name, steering, concurrency, stream)
                          for name, steering in (("token by token, β = 0 (no value model)", Steering(top_k=args.top_k, beta=0.0)),
                                                 ("VAS through the API (8-layer value model)",
                                                  Steering([value], beta=4.0, top_k=args.top_k)))
                          for concurrency, stream in ((1, False), (4, False), (1, True))]
        for name, steering, concurrency, stream in configurations:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                rows = generate(policy(stream), prompts, steering, Path(tmp) / "out.jsonl", temperature=0.7,
                                max_new_tokens=args.tokens, concurrency=concurrency, progress=False)
                seconds = time.perf_counter() - start
            tokens = sum(r["tokens"] for r in rows)
            results.append({"method": name + (", streamed" if stream else ""), "concurrency": concurrency,
                            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                            "outside_mass": sum(r["outside_mass"] for r in rows) / len(rows)})
            print(results[-1], flush=True)
    plain_rate = results[0]["tokens_per_second"]
    lines = ["| method | concurrency | tokens | s | tokens/s | vs plain API sampling (concurrency 1) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['concurrency']} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_second']:.1f} | {r['tokens_per_second'] / plain_rate:.2f}× |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                    "policy": args.policy,
                                    "prompts": len(prompts), "max_new_tokens": args.tokens, "top_k": args.top_k,
                                    "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
