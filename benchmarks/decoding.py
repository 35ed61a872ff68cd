"""Decoding speed and memory, side by side in one run: plain sampling, VAS, a naive VAS reference, Best-of-N.

    python benchmarks/decoding.py [--device auto] [--dtype float32]     # the full table
    python benchmarks/decoding.py --targets --repeats 5                 # issue 3's targets, repeated
    python benchmarks/decoding.py --heads --repeats 3                   # the last head against the next head

Every configuration runs in its own subprocess, so its peak memory is its own (CPU: peak resident set
size of that process, weights included; CUDA: ``torch.cuda.max_memory_allocated``). All use the embedded
SmolLM2-135M-Instruct as π0, 8 chitchat openings as prompts (the first one alone at batch 1),
temperature 0.7, and no early stop: every row generates exactly the asked number of tokens. Each
configuration is warmed up at its own shapes first. With ``--repeats R`` the configurations run R times
round-robin, so that slow spells of a shared machine hit all of them alike; ratios are taken within each
round, and their median and range reported.

- ``plain-generate``: ``model.generate`` (do_sample, top_k=0), transformers' own loop: the baseline.
- ``plain-loop``: :func:`vas.decoding.loop.sample` without steering (our loop, which VAS uses).
- ``vas``: :func:`vas.decoding.loop.sample` with a value model the size of π0 (same backbone, LoRA merged), or
  a layer-truncated one (``layers``: its first L layers), in π0's dtype or in ``value_dtype``, with the ``last``
  head (k + 1 value-model tokens per row per step) or the ``next`` head (``head``: one token per row per step;
  ``k`` may then be ``"all"``).
- ``naive``: the authors' way: each of the k candidates scored by its own forward pass over the whole
  re-fed context (no cache). Its cost per step grows linearly with the position, so it is timed at 4
  evenly spaced steps (first and last included), whose mean estimates the mean over all steps, and added
  to the ``plain-loop`` step time; the rest of the decoding uses the fast scorer (whose caches therefore
  count in its peak memory). At those steps its values are checked against the fast scorer's
  (``max_abs_diff``).
- ``best-of-n``: N samples per prompt from ``generate`` in one batch, then the positivity reward of all of
  them; time per returned token = (decoding + reward) / tokens.

Times: ``seconds_per_token`` is a whole generation (prompt processing included) divided by its tokens;
``decode_seconds_per_token`` leaves the prompt out: (time of T tokens − time of 1 token) / (T − 1).
"""

from __future__ import annotations

import argparse
import contextlib
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
IDENTITY = ("kind", "batch", "tokens", "k", "n", "layers", "value_dtype", "head")


def configurations(quick: bool, dtype: str, targets_only: bool = False, heads: bool = False) -> list[dict]:
    """The runs, in table order. ``quick`` shrinks them to check the script itself in a minute. In float32,
    VAS also runs with the value model in bfloat16 (π0 in float32): ``--value-dtype auto``'s choice on
    hardware with native bf16. ``targets_only``: just what issue 3's targets need (batch 8). ``heads``: the
    last head against the next head at batch 8, k = 10, same-size and quarter-depth value models."""
    tokens = 8 if quick else 64
    lengths = (8, 16) if quick else (32, 256)
    mixed = dtype == "float32"

    def vas(batch, **extra):
        return {"kind": "vas", "batch": batch, "tokens": tokens, "k": 20, **extra}

    if heads:
        return [{"kind": "plain-generate", "batch": 8, "tokens": tokens}, {"kind": "plain-loop", "batch": 8, "tokens": tokens},
                vas(8, k=10), vas(8, k=10, layers="quarter"), vas(8, k=10, head="next"),
                vas(8, k=10, layers="quarter", head="next"), vas(8, k="all", layers="quarter", head="next")]
    if targets_only:
        runs = [{"kind": "plain-generate", "batch": 8, "tokens": tokens}, {"kind": "plain-loop", "batch": 8, "tokens": tokens},
                vas(8), vas(8, layers="quarter")]
        if mixed:
            runs += [vas(8, value_dtype="bfloat16"), vas(8, layers="quarter", value_dtype="bfloat16")]
        return runs + [vas(8, tokens=t) for t in lengths]
    runs = []
    for batch in (1, 8):
        runs += [{"kind": "plain-generate", "batch": batch, "tokens": tokens},
                 {"kind": "plain-loop", "batch": batch, "tokens": tokens}]
        runs += [vas(batch, k=k) for k in ((5, 20) if quick else (5, 10, 20, 50))]
        runs += [vas(batch, layers="quarter")]
        if mixed:
            runs += [vas(batch, value_dtype="bfloat16"), vas(batch, layers="quarter", value_dtype="bfloat16")]
        runs += [{"kind": "naive", "batch": batch, "tokens": tokens, "k": 20}]
        runs += [{"kind": "best-of-n", "batch": batch, "tokens": tokens, "n": n} for n in ((4,) if quick else (4, 16, 64))]
        runs += [vas(batch, tokens=t) for t in lengths]
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
    :class:`vas.value.scorers.CandidateScorer`; it times itself at ``timed_steps`` and delegates the other steps to
    the fast scorer, whose values it is checked against."""

    def __init__(self, model, fast, timed_steps, device):
        self.model, self.fast, self.timed_steps, self.device = model, fast, set(timed_steps), device
        self.ids = self.mask = None
        self.step, self.seconds, self.max_abs_diff = 0, [], 0.0

    def score(self, rollout, candidates, active=None, beta=None):
        import torch

        new_ids, new_mask = rollout.appended.ids, rollout.appended.mask
        self.ids = new_ids if self.ids is None else torch.cat([self.ids, new_ids], dim=1)
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        fast = self.fast.score(rollout, candidates)
        if self.step in self.timed_steps:
            mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

            def naive_values():
                values = []
                for j in range(candidates.shape[1]):
                    ids = torch.cat([self.ids, candidates[:, j : j + 1]], dim=1)
                    values.append(self.model(ids, mask)[:, -1])  # positions from the mask
                return torch.stack(values, dim=1)

            if not self.seconds:
                naive_values()  # warm-up of the no-cache path
            _sync(self.device)
            start = time.perf_counter()
            naive = naive_values()
            _sync(self.device)
            self.seconds.append(time.perf_counter() - start)
            self.max_abs_diff = max(self.max_abs_diff, float((naive - fast).abs().max()))
        self.step += 1
        return fast


def worker(config: dict, args, around=contextlib.nullcontext) -> dict:
    """Run one configuration in this process; ``around()`` wraps its timed generation (for the profiler)."""
    import torch
    import transformers

    import vas.decoding.loop
    from vas.config import EMBEDDED_MODEL
    from vas.models import (
        load_policy,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from vas.prompts import encode_prompts, load_prompts
    from vas.rewards import load_reward, score
    from vas.models import left_pad
    from vas.policy.local import LocalPolicy
    from vas.value.model import ValueModel
    from vas.value.scorers import CandidateScorer

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
        path = Path(args.value_dir) / f"{config.get('layers') or 'full'}-{config.get('head', 'last')}"
        value_dtype = resolve_dtype(config.get("value_dtype", args.dtype), device)
        value_model = ValueModel.from_pretrained(path, device=device, dtype=value_dtype)
        steering = vas.decoding.loop.Steering([value_model], beta=1.0, top_k=config["k"])
    T, B = config["tokens"], config["batch"]
    generator = torch.Generator().manual_seed(0)
    record = {**config, "loaded_mib": _peak_mib(device)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def loop(tokens):
        local = LocalPolicy(policy, tokenizer, eos_token_ids=[], pad_token_id=tokenizer.pad_token_id)
        return vas.decoding.loop.sample(local, prompt_ids, steering, max_new_tokens=tokens, generator=generator)

    def hf_generate(n, tokens):
        ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
        return policy.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=0.7,
                               top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                               num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)

    def timed(run) -> float:
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        return time.perf_counter() - start

    if config["kind"] == "naive":
        steps = [round(i * (T - 1) / (NAIVE_STEPS - 1)) for i in range(NAIVE_STEPS)]
        scorers = []

        def make(model):
            scorers.append(NaiveScorer(model, CandidateScorer(model), steps, device))
            return scorers[-1]

        vas.decoding.loop.CandidateScorer = make  # the loop builds its scorers through this name
        with around():
            loop(T)
        # per step: π0's step (a plain-loop run, warmed up by the run above) + the naive scoring
        steering = None
        plain_step = timed(lambda: loop(T)) / T
        naive = sum(scorers[0].seconds) / len(scorers[0].seconds)
        record.update(seconds_per_token=plain_step + naive, naive_score_seconds=naive,
                      max_abs_diff=scorers[0].max_abs_diff, naive_timed_steps=steps)
    elif config["kind"] == "best-of-n":
        n = config["n"]

        def best_of_n(tokens):
            out = hf_generate(n, tokens)
            responses = tokenizer.batch_decode(out[:, -tokens:], skip_special_tokens=True)
            rewards = score(load_reward("positivity"), [t for t in texts for _ in range(n)], responses)
            return rewards.view(B, n).max(dim=1)

        best_of_n(2)  # warm-up at the timed batch shape
        with around():
            record["seconds_per_token"] = timed(lambda: best_of_n(T)) / T
    else:
        run = (lambda t: hf_generate(1, t)) if config["kind"] == "plain-generate" else loop
        run(2)  # warm-up
        first = timed(lambda: run(1))  # the prompt and one token
        with around():
            total = timed(lambda: run(T))
        record["seconds_per_token"] = total / T
        record["decode_seconds_per_token"] = (total - first) / (T - 1)
    record["peak_mib"] = _peak_mib(device)
    record["tokens_per_second"] = B / record["seconds_per_token"]
    return record


# ---------------------------------------------------------------------------------------------------- parent


def make_value_models(directory: Path) -> int:
    """Full-depth and quarter-depth value models with the last and the next head on the embedded backbone,
    with random LoRA and head (speed does not depend on training), saved like trained ones in
    ``directory/{full,quarter}-{last,next}``; returns the backbone's depth."""
    import torch

    from vas.config import EMBEDDED_MODEL
    from vas.models import load_config, load_tokenizer
    from vas.value.model import ValueModel

    torch.manual_seed(0)
    depth = load_config(EMBEDDED_MODEL).num_hidden_layers
    for layers in ("full", "quarter"):
        for head in ("last", "next"):
            model = ValueModel.create(EMBEDDED_MODEL, lora_rank=16, head=head,
                                      num_layers=depth // 4 if layers == "quarter" else None)
            with torch.no_grad():
                for weight in (p for p in model.head.parameters() if p.dim() == 2):
                    torch.nn.init.normal_(weight, std=0.05)
            model.save_pretrained(directory / f"{layers}-{head}", tokenizer=load_tokenizer(EMBEDDED_MODEL))
    return depth


def label(r: dict, depth: int) -> str:
    if r["kind"] == "vas":
        parts = [f"L={depth // 4}/{depth}"] if r.get("layers") else []
        parts += [r["value_dtype"]] if r.get("value_dtype") else []
        parts += [f"{r['head']} head"] if r.get("head") else []
        return f"VAS k={r['k']}" + (f", value model {' '.join(parts)}" if parts else "")
    if r["kind"] == "naive":
        return f"naive VAS reference k={r['k']}"
    if r["kind"] == "best-of-n":
        return f"Best-of-{r['n']} (+ reward)"
    return {"plain-generate": "plain sampling (`generate`)", "plain-loop": "plain sampling (our loop)"}[r["kind"]]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration, in first-seen order: the median of each time over its repeats."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r.get(k) for k in IDENTITY), []).append(r)
    rows = []
    for runs in groups.values():
        row = {k: runs[0][k] for k in IDENTITY if k in runs[0]}
        for field in ("seconds_per_token", "decode_seconds_per_token", "peak_mib", "max_abs_diff"):
            if field in runs[0]:
                row[field] = median([r[field] for r in runs])
        row["tokens_per_second"] = row["batch"] / row["seconds_per_token"]
        row["repeats"] = len(runs)
        rows.append(row)
    return rows


def table(rows: list[dict], depth: int) -> str:
    """The Markdown table of BENCHMARKS.md."""
    lines = ["| batch | tokens | method | ms per step, prompt included | ms per step, prompt excluded | tokens/s "
             "| × plain `generate` | × plain (our loop) | peak memory (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = []
        for kind in ("plain-generate", "plain-loop"):
            base = [x for x in rows if x["kind"] == kind and x["batch"] == r["batch"] and x["tokens"] == r["tokens"]]
            base = base or [x for x in rows if x["kind"] == kind and x["batch"] == r["batch"]]
            ratios.append(f"{r['seconds_per_token'] / base[0]['seconds_per_token']:.2f}" if base else "—")
        decode = f"{1000 * r['decode_seconds_per_token']:.1f}" if "decode_seconds_per_token" in r else "—"
        lines.append(f"| {r['batch']} | {r['tokens']} | {label(r, depth)} | {1000 * r['seconds_per_token']:.1f} | {decode} "
                     f"| {r['tokens_per_second']:.1f} | {ratios[0]} | {ratios[1]} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def targets(results: list[dict], repeats: int) -> dict:
    """Issue 3's ratios at batch 8, each taken within one round of the repeats: median, min, max."""

    def find(round_, field, match):
        for r in results:
            if r["round"] == round_ and all(r.get(k) == v for k, v in match.items()):
                return r.get(field)
        return None

    def ratio(numerator: dict, denominator: dict, field="seconds_per_token"):
        values = []
        for i in range(repeats):
            a, b = find(i, field, numerator), find(i, field, denominator)
            if a is not None and b is not None:
                values.append(a / b)
        return {"median": median(values), "min": min(values), "max": max(values), "rounds": len(values)} if values else None

    plain = {"kind": "plain-generate", "batch": 8, "tokens": 64}
    loop = {"kind": "plain-loop", "batch": 8, "tokens": 64}
    vas = {"kind": "vas", "batch": 8, "k": 20, "tokens": 64, "layers": None, "value_dtype": None, "head": None}
    quarter = {**vas, "layers": "quarter"}
    bf16, quarter_bf16 = {**vas, "value_dtype": "bfloat16"}, {**quarter, "value_dtype": "bfloat16"}
    def at_k10(**match):
        return {**vas, "k": 10, **match}

    found = {
        "VAS k=20 ÷ plain generate (target ≤ 3)": ratio(vas, plain),
        "VAS k=20 ÷ plain, our loop": ratio(vas, loop),
        "naive reference ÷ VAS k=20 (target ≥ 10)": ratio({"kind": "naive", "batch": 8}, vas),
        "VAS k=20, per token at 256 ÷ at 32 tokens, prompt excluded (target ≤ 1.5)": ratio(
            {**vas, "tokens": 256}, {**vas, "tokens": 32}, "decode_seconds_per_token"),
        "VAS k=20, per token at 256 ÷ at 32 tokens, prompt included": ratio({**vas, "tokens": 256}, {**vas, "tokens": 32}),
        "VAS k=20, quarter-depth value model ÷ plain generate (target ≤ 1.5)": ratio(quarter, plain),
        "VAS k=20, bf16 value model ÷ plain generate (target ≤ 3)": ratio(bf16, plain),
        "VAS k=20, quarter-depth bf16 value model ÷ plain generate (target ≤ 1.5)": ratio(quarter_bf16, plain),
        "VAS k=10, last head ÷ plain generate": ratio(at_k10(), plain),
        "VAS k=10, next head ÷ plain generate (target ≤ 1.6)": ratio(at_k10(head="next"), plain),
        "VAS k=10, quarter-depth last head ÷ plain generate": ratio(at_k10(layers="quarter"), plain),
        "VAS k=10, quarter-depth next head ÷ plain generate": ratio(at_k10(layers="quarter", head="next"), plain),
        "VAS k=all, quarter-depth next head ÷ plain generate": ratio(at_k10(k="all", layers="quarter", head="next"), plain),
    }
    return {name: value for name, value in found.items() if value is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/decoding-<device>-<dtype>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--targets", action="store_true", help="only what issue 3's targets need (batch 8)")
    parser.add_argument("--heads", action="store_true", help="only the last head against the next head (batch 8)")
    parser.add_argument("--repeats", type=int, default=1, help="run every configuration this many times, round-robin")
    parser.add_argument("--profile", metavar="CONFIG", help="run one configuration in this process, its timed generation "
                        "under torch.profiler, e.g. '{\"kind\": \"vas\", \"batch\": 8, \"tokens\": 64, \"k\": 20}'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--value-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker), args)))
        return

    import datasets
    import peft
    import torch
    import transformers

    from vas.models import resolve_device

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        profiler = profile(activities=activities)
        with tempfile.TemporaryDirectory() as tmp:
            make_value_models(Path(tmp))
            args.value_dir = tmp
            print(worker(json.loads(args.profile), args, around=lambda: profiler))
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return

    device = resolve_device(args.device)
    suffix = ("-targets" if args.targets else "") + ("-heads" if args.heads else "") + ("-quick" if args.quick else "")
    out = args.out or Path(__file__).parent / "results" / f"decoding-{device.type}-{args.dtype}{suffix}.json"
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        depth = make_value_models(Path(tmp))
        for round_ in range(args.repeats):
            for config in configurations(args.quick, args.dtype, args.targets, args.heads):
                cmd = [sys.executable, __file__, "--worker", json.dumps(config), "--device", args.device, "--dtype",
                       args.dtype, "--value-dir", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:  # e.g. out of memory: record it and go on
                    print(f"benchmark {config} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
                    failures.append({**config, "round": round_, "exit_status": proc.returncode, "stderr": proc.stderr[-2000:]})
                    continue
                results.append({**json.loads(lines[-1][len("RESULT "):]), "round": round_})
                r = results[-1]
                print(f"[{round_ + 1}/{args.repeats}] {label(r, depth):42s} batch {r['batch']} tokens {r['tokens']:3d}: "
                      f"{1000 * r['seconds_per_token']:8.1f} ms/step  peak {r['peak_mib']:.0f} MiB", flush=True)
    rows = summarise(results)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "datasets": datasets.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device.type, "dtype": args.dtype, "depth": depth, "repeats": args.repeats,
        "rows": rows, "runs": results, "failures": failures,
        "targets": None if args.quick else targets(results, args.repeats),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print()
    print(table(rows, depth))
    for name, value in (report["targets"] or {}).items():
        print(f"- {name}: {value['median']:.2f} (range {value['min']:.2f}–{value['max']:.2f}, {value['rounds']} rounds)")
    print(f"\n→ {out}")


if __name__ == "__main__":
    main()
