"""Decoding speed and memory, side by side in one run: plain sampling, VAS, a naive VAS reference, Best-of-N.

    python benchmarks/decoding.py [--device auto] [--dtype float32] [--out benchmarks/results/decoding-cpu-float32.json]

Every configuration runs in its own subprocess, so its peak memory is its own (CPU: peak resident set
size of that process; CUDA: ``torch.cuda.max_memory_allocated``). All use the embedded SmolLM2-135M-Instruct
as π0, 8 chitchat openings as prompts (the first one alone at batch 1), temperature 0.7, and no early stop:
every row generates exactly the asked number of tokens, so times compare like for like.

- ``plain-generate``: ``model.generate`` (do_sample, top_k=0), transformers' own loop: the baseline.
- ``plain-loop``: :func:`vas.sampling.sample` without steering (our loop, which VAS uses).
- ``vas``: :func:`vas.sampling.sample` with a value model the size of π0 (same backbone, LoRA merged), or
  a layer-truncated one (``layers``: its first L layers).
- ``naive``: the authors' way: each of the k candidates scored by its own forward pass over the whole
  re-fed context (no cache). Its cost per step grows linearly with the position, so it is timed at 4
  evenly spaced steps (first and last included), whose mean is the mean over all steps, and added to the
  ``plain-loop`` step time; the rest of the decoding uses the fast scorer. At those steps its values are
  checked against the fast scorer's (``max_abs_diff``).
- ``best-of-n``: N samples per prompt from ``generate`` in one batch, then the positivity reward of all of
  them; time per returned token = (decoding + reward) / (prompts × tokens).

The JSON holds one record per configuration plus the machine, versions and targets of issue 3; the
Markdown table for BENCHMARKS.md is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAIVE_STEPS = 4


def configurations(quick: bool, dtype: str) -> list[dict]:
    """The runs, in table order. ``quick`` shrinks them to check the script itself in a minute. In float32,
    VAS also runs with the value model in bfloat16 (π0 in float32), the ``--value-dtype auto`` choice on
    hardware with native bf16."""
    tokens = 8 if quick else 64
    runs = []
    for batch in (1, 8):
        runs += [{"kind": "plain-generate", "batch": batch, "tokens": tokens},
                 {"kind": "plain-loop", "batch": batch, "tokens": tokens}]
        runs += [{"kind": "vas", "batch": batch, "tokens": tokens, "k": k} for k in ((5, 20) if quick else (5, 10, 20, 50))]
        runs += [{"kind": "vas", "batch": batch, "tokens": tokens, "k": 20, "layers": "quarter"},
                 {"kind": "naive", "batch": batch, "tokens": tokens, "k": 20}]
        if dtype == "float32":
            runs += [{"kind": "vas", "batch": batch, "tokens": tokens, "k": 20, "value_dtype": "bfloat16"},
                     {"kind": "vas", "batch": batch, "tokens": tokens, "k": 20, "layers": "quarter", "value_dtype": "bfloat16"}]
    runs += [{"kind": "best-of-n", "batch": 8, "tokens": tokens, "n": n} for n in ((4,) if quick else (4, 16, 64))]
    runs += [{"kind": "vas", "batch": 8, "tokens": t, "k": 20} for t in ((8, 16) if quick else (32, 256))]
    return runs


# ---------------------------------------------------------------------------------------------------- worker


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class NaiveScorer:
    """The reference the paper's code follows: V(s ⊕ x) by a full forward over the re-fed context, one
    candidate at a time (all rows of the batch together), no KV cache. Same interface as
    :class:`vas.value.CandidateScorer`; it times itself at ``timed_steps`` and delegates the other steps to
    the fast scorer, whose values it is checked against."""

    def __init__(self, model, fast, timed_steps, device):
        self.model, self.fast, self.timed_steps, self.device = model, fast, set(timed_steps), device
        self.ids = self.mask = None
        self.step, self.seconds, self.max_abs_diff = 0, [], 0.0

    def score(self, new_ids, new_mask, candidates):
        import torch

        from vas.value import position_ids_from_mask

        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        fast = self.fast.score(new_ids, new_mask, candidates)
        if self.step in self.timed_steps:
            _sync(self.device)
            start = time.perf_counter()
            values = []
            ones = torch.ones_like(self.mask[:, :1])
            mask = torch.cat([self.mask, ones], dim=1)
            positions = position_ids_from_mask(mask)
            for j in range(candidates.shape[1]):
                ids = torch.cat([self.ids, candidates[:, j : j + 1]], dim=1)
                values.append(self.model(ids, mask, position_ids=positions)[:, -1])
            naive = torch.stack(values, dim=1)
            _sync(self.device)
            self.seconds.append(time.perf_counter() - start)
            self.max_abs_diff = max(self.max_abs_diff, float((naive - fast).abs().max()))
        self.step += 1
        return fast


def worker(config: dict, args) -> dict:
    import torch
    import transformers

    import vas.sampling
    from vas.models import (
        EMBEDDED_MODEL,
        load_policy,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from vas.prompts import encode_prompts, load_prompts
    from vas.rewards import load_reward, score
    from vas.value import CandidateScorer, ValueModel

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    policy = load_policy(EMBEDDED_MODEL, device=device, dtype=dtype)
    texts = load_prompts("chitchat", limit=8)[: config["batch"]]
    prompt_ids = encode_prompts(tokenizer, texts)
    steering = None
    if config["kind"] in ("vas", "naive"):
        path = args.value_full if config.get("layers") is None else args.value_quarter
        value_dtype = resolve_dtype(config.get("value_dtype", args.dtype), device)
        value_model = ValueModel.from_pretrained(path, device=device, dtype=value_dtype)
        steering = vas.sampling.Steering([value_model], beta=1.0, top_k=config["k"])
    T, B = config["tokens"], config["batch"]
    generator = torch.Generator(device=device).manual_seed(0)
    record = {**config, "loaded_mib": _peak_mib(device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def loop(tokens):
        return vas.sampling.sample(policy, prompt_ids, eos_token_ids=[], pad_token_id=tokenizer.pad_token_id,
                                   steering=steering, max_new_tokens=tokens, generator=generator)

    def hf_generate(prompts, n, tokens):
        from vas.sampling import left_pad

        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        return policy.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=0.7,
                               top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                               num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)

    if config["kind"] == "naive":
        timed = [round(i * (T - 1) / (NAIVE_STEPS - 1)) for i in range(NAIVE_STEPS)]
        scorers = []

        def make(model):
            scorers.append(NaiveScorer(model, CandidateScorer(model), timed, device))
            return scorers[-1]

        vas.sampling.CandidateScorer = make  # the loop builds its scorers through this name
        loop(T)
        # per step: π0's step (timed in a plain-loop run, warmed up by the run above) + the naive scoring
        steering = None
        _sync(device)
        plain = time.perf_counter()
        loop(T)
        _sync(device)
        plain_step = (time.perf_counter() - plain) / T
        naive = sum(scorers[0].seconds) / len(scorers[0].seconds)
        record.update(seconds_per_token=plain_step + naive, naive_score_seconds=naive,
                      max_abs_diff=scorers[0].max_abs_diff, naive_timed_steps=timed)
    else:
        warm = {"plain-generate": lambda: hf_generate(prompt_ids, 1, 2), "best-of-n": lambda: hf_generate(prompt_ids, 1, 2)}
        warm.get(config["kind"], lambda: loop(2))()
        _sync(device)
        start = time.perf_counter()
        if config["kind"] == "plain-generate":
            hf_generate(prompt_ids, 1, T)
        elif config["kind"] == "best-of-n":
            n = config["n"]
            out = hf_generate(prompt_ids, n, T)
            responses = tokenizer.batch_decode(out[:, -T:], skip_special_tokens=True)
            decoded = time.perf_counter()
            rewards = score(load_reward("positivity"), [t for t in texts for _ in range(n)], responses).view(B, n)
            rewards.max(dim=1)
            record["reward_seconds"] = time.perf_counter() - decoded
        else:
            loop(T)
        _sync(device)
        record["seconds_per_token"] = (time.perf_counter() - start) / T
    record["peak_mib"] = _peak_mib(device)
    record["tokens_per_second"] = B / record["seconds_per_token"]
    return record


# ---------------------------------------------------------------------------------------------------- parent


def make_value_models(directory: Path) -> tuple[str, str, int]:
    """A full-depth and a quarter-depth value model on the embedded backbone, with random LoRA and head
    (speed does not depend on training), saved like trained ones."""
    import torch

    from vas.models import EMBEDDED_MODEL, load_tokenizer
    from vas.value import ValueModel

    torch.manual_seed(0)
    paths = []
    depth = None
    for name, layers in (("full", None), ("quarter", "quarter")):
        if layers == "quarter":
            layers = depth // 4
        model = ValueModel.create(EMBEDDED_MODEL, lora_rank=16, num_layers=layers)
        depth = depth or model.value_config["num_layers"]
        with torch.no_grad():
            torch.nn.init.normal_(model.head.weight, std=0.05)
        model.save_pretrained(directory / name, tokenizer=load_tokenizer(EMBEDDED_MODEL))
        paths.append(str(directory / name))
    return paths[0], paths[1], depth


def label(r: dict, depth: int) -> str:
    if r["kind"] == "vas":
        parts = [f"L={depth // 4}/{depth}"] if r.get("layers") else []
        parts += [r["value_dtype"]] if r.get("value_dtype") else []
        return f"VAS k={r['k']}" + (f", value model {' '.join(parts)}" if parts else "")
    if r["kind"] == "naive":
        return f"naive VAS reference k={r['k']}"
    if r["kind"] == "best-of-n":
        return f"Best-of-{r['n']} (+ reward)"
    return {"plain-generate": "plain sampling (`generate`)", "plain-loop": "plain sampling (our loop)"}[r["kind"]]


def table(results: list[dict], depth: int) -> str:
    base = {r["batch"]: r["seconds_per_token"] for r in results if r["kind"] == "plain-generate"}
    lines = ["| batch | tokens | method | ms / token step | tokens/s | × plain `generate` | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["seconds_per_token"] / base[r["batch"]]
        lines.append(f"| {r['batch']} | {r['tokens']} | {label(r, depth)} | {1000 * r['seconds_per_token']:.1f} | "
                     f"{r['tokens_per_second']:.1f} | {ratio:.2f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def targets(results: list[dict]) -> dict:
    def get(**match):
        return next(r["seconds_per_token"] for r in results if all(r.get(k) == v for k, v in match.items()))

    plain = get(kind="plain-generate", batch=8)
    vas20 = get(kind="vas", batch=8, k=20, tokens=64, layers=None, value_dtype=None)
    mixed = {}
    if any(r.get("value_dtype") for r in results):
        mixed = {
            "vas_k20_bf16_value_over_plain (target <= 3)": get(kind="vas", batch=8, k=20, layers=None, value_dtype="bfloat16") / plain,
            "vas_k20_quarter_depth_bf16_value_over_plain (target <= 1.5)": get(kind="vas", batch=8, k=20, layers="quarter", value_dtype="bfloat16") / plain,
        }
    return {
        "vas_k20_over_plain (target <= 3)": vas20 / plain,
        "naive_k20_over_vas_k20 (target >= 10)": get(kind="naive", batch=8) / vas20,
        "vas_256_over_32_per_token (target <= 1.5)": get(kind="vas", batch=8, k=20, tokens=256, value_dtype=None) / get(kind="vas", batch=8, k=20, tokens=32, value_dtype=None),
        "vas_k20_quarter_depth_over_plain (target <= 1.5)": get(kind="vas", batch=8, k=20, tokens=64, layers="quarter", value_dtype=None) / plain,
        **mixed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/decoding-<device>-<dtype>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--profile", metavar="CONFIG", help='run one configuration under torch.profiler and print '
                        'where the time goes, e.g. \'{"kind": "vas", "batch": 8, "tokens": 16, "k": 20}\'')
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--value-full", help=argparse.SUPPRESS)
    parser.add_argument("--value-quarter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker), args)))
        return

    import torch
    import transformers

    from vas.models import resolve_device

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with tempfile.TemporaryDirectory() as tmp:
            args.value_full, args.value_quarter, _ = make_value_models(Path(tmp))
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=activities) as prof:
                print(worker(json.loads(args.profile), args))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return

    device = resolve_device(args.device)
    out = args.out or Path(__file__).parent / "results" / f"decoding-{device.type}-{args.dtype}{'-quick' if args.quick else ''}.json"
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        full, quarter, depth = make_value_models(Path(tmp))
        for config in configurations(args.quick, args.dtype):
            cmd = [sys.executable, __file__, "--worker", json.dumps(config), "--device", args.device, "--dtype",
                   args.dtype, "--value-full", full, "--value-quarter", quarter]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:  # e.g. out of memory: record it and go on
                print(f"benchmark {config} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                failures.append({**config, "exit_status": proc.returncode, "stderr": proc.stderr[-2000:]})
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
            r = results[-1]
            print(f"{label(r, depth):45s} batch {r['batch']} tokens {r['tokens']:3d}: "
                  f"{1000 * r['seconds_per_token']:8.1f} ms/step  peak {r['peak_mib']:.0f} MiB", flush=True)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device.type, "dtype": args.dtype, "depth": depth, "results": results, "failures": failures,
        "targets": None if args.quick or failures else targets(results),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print()
    print(table(results, depth))
    if report["targets"]:
        print()
        for name, value in report["targets"].items():
            print(f"- {name}: {value:.2f}")
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
