"""`vas collect` on the default engine (the project's own loop on transformers) against `--engine vllm`, in one
run on the same prompts.

    python benchmarks/collect_engines.py [--prompts 64] [--samples-per-prompt 4] [--out benchmarks/results/collect-engines-cpu.json]

Each engine collects ``prompts × samples_per_prompt`` responses (chitchat openings, ≤ 40 new tokens,
temperature 0.7, positivity reward) through :func:`vas.collect.collect`, at the default engine's batch size
(16) and, for vLLM in float32 (π0's dtype on the default engine and `vas collect --engine vllm`'s on a CPU), also at a
larger batch (vLLM schedules a whole batch at once), then in bfloat16 (vLLM's own choice on a CPU) at the larger
batch. Responses per second count
finished collections, reward and atomic writes included; vLLM's start-up (its engine and worker) is timed
apart (with a one-token warm-up collection), since it is paid once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import torch

    from vas.collect import collect
    from vas.config import EMBEDDED_MODEL, CollectConfig
    from vas.models import load_policy, load_tokenizer
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.serving.engine import VllmPolicy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--large-batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/collect-engines-cpu.json"))
    args = parser.parse_args()

    prompts = load_prompts("chitchat", limit=args.prompts)
    reward = load_reward("positivity")
    work = Path(tempfile.mkdtemp(prefix="vas-collect-bench-"))
    results = []

    def timed(policy, name: str, batch_size: int) -> None:
        start = time.perf_counter()
        data = collect(policy, prompts, reward, work / f"{name}-{batch_size}",
                       CollectConfig(samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                                     batch_size=batch_size), progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in data["response_ids"])
        results.append({"engine": name, "batch_size": batch_size, "responses": len(data), "tokens": tokens,
                        "seconds": seconds, "responses_per_second": len(data) / seconds,
                        "tokens_per_second": tokens / seconds, "mean_reward": sum(data["reward"]) / len(data)})
        print(f"{name:14s} batch {batch_size:4d}: {len(data)} responses, {tokens} tokens in {seconds:.1f} s → "
              f"{len(data) / seconds:.2f} responses/s, {tokens / seconds:.0f} tokens/s", flush=True)

    torch.manual_seed(0)
    local = LocalPolicy(load_policy(EMBEDDED_MODEL), load_tokenizer(EMBEDDED_MODEL))
    timed(local, "transformers", 16)
    del local
    startup = {}
    for dtype in ("float32", "bfloat16"):
        start = time.perf_counter()
        vllm = VllmPolicy(EMBEDDED_MODEL, dtype=dtype)
        collect(vllm, prompts[:1], reward, work / f"warm-up-{dtype}", CollectConfig(samples_per_prompt=1, max_new_tokens=1),
                progress=False)  # starts it
        startup[dtype] = time.perf_counter() - start
        print(f"vLLM start-up ({dtype}): {startup[dtype]:.1f} s", flush=True)
        for batch_size in ((16, args.large_batch) if dtype == "float32" else (args.large_batch,)):
            timed(vllm, f"vllm-{dtype}", batch_size)
        vllm.shutdown()
    base = results[0]["responses_per_second"]
    for r in results:
        r["ratio_to_default_engine"] = r["responses_per_second"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                "torch_threads": torch.get_num_threads()},
                                    "settings": vars(args) | {"out": str(args.out)}, "vllm_startup_seconds": startup,
                                    "results": results}, indent=2) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
