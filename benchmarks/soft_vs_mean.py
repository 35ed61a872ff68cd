"""Soft values against the mean at equal KL: one distributional value model steering π0 with its value V (Eq. 5) and
with the soft guide β·Q_β (``vas evaluate --soft``, :meth:`vas.value.model.ValueModel.values`), on the same
held-out prompts.

    python benchmarks/soft_vs_mean.py VALUE_DIR [--start 1152] [--limit 96] [--mean-betas 2,8,32]
        [--soft-betas 4,8,16,32,64] [--out benchmarks/results/soft-vs-mean]

The defaults are `vas experiment scaling`'s evaluation prompts and settings (chitchat openings from 1152,
positivity, k = 10, ≤ 40 new tokens, 2 responses per prompt, seed 0), on 96 openings instead of 32, so VALUE_DIR can
be a distributional value model trained on its largest size. The two guides differ between candidates by different
amounts at the same β (`benchmarks/soft_value_spread.py`), so the comparison is at equal KL, not equal β. For each
soft point the script prints the reward the mean guide reaches at that KL (interpolated along its curve from plain
sampling) and the KL the mean guide needs for the soft point's reward (:func:`vas.evaluate.kl_at_reward`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate, kl_at_reward
    from vas.models import load_policy, load_tokenizer, resolve_device, resolve_value_dtype
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.value.model import ValueModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("value_dir")
    parser.add_argument("--start", type=int, default=1152)
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--mean-betas", default="2,8,32")
    parser.add_argument("--soft-betas", default="4,8,16,32,64")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soft-vs-mean"))
    args = parser.parse_args()

    device = resolve_device("auto")
    value_model = ValueModel.from_pretrained(args.value_dir, device=device, dtype=resolve_value_dtype("auto", device))
    if value_model.kind != "distributional":
        raise SystemExit(f"{args.value_dir} has the {value_model.kind} head: give a distributional value model")
    base_model = value_model.value_config["backbone"]
    policy = LocalPolicy(load_policy(base_model, device=device), load_tokenizer(base_model))
    prompts = load_prompts("chitchat", start=args.start, limit=args.limit)
    reward = load_reward("positivity")
    reports = {}
    for guide, betas in (("mean", args.mean_betas), ("soft", args.soft_betas)):
        config = EvaluateConfig(betas=[float(b) for b in betas.split(",")], top_k=10, best_of=(1,),
                                vas_samples_per_prompt=2, soft=guide == "soft", max_new_tokens=40, batch_size=16,
                                seed=0)
        reports[guide] = evaluate(policy, prompts, reward, [value_model], args.out / guide, config,
                                  metadata={"value_dir": str(args.value_dir), "guide": guide})
    plain = reports["mean"]["plain"]["reward"]
    mean_curve = [(0.0, plain)] + [(v["kl"], v["reward"]) for v in reports["mean"]["vas"]]
    rows = []
    print(f"plain π0: {plain:.3f}")
    print("| guide | β | reward ± s.e. | KL nats | mean guide's reward at that KL | mean guide's KL for that reward |")
    print("|---|---|---|---|---|---|")
    for guide in ("mean", "soft"):
        for v in reports[guide]["vas"]:
            at_kl = _reward_at_kl(mean_curve, v["kl"])
            needed = kl_at_reward(mean_curve, v["reward"])
            rows.append({"guide": guide, "beta": v["beta"], "reward": v["reward"], "reward_sem": v["reward_sem"],
                         "kl": v["kl"], "mean_reward_at_kl": at_kl, "mean_kl_for_reward": needed})
            print(f"| {guide} | {v['beta']:g} | {v['reward']:.3f} ± {v['reward_sem']:.3f} | {v['kl']:.2f} | "
                  f"{'—' if at_kl is None else f'{at_kl:.3f}'} | {'out of range' if needed is None else f'{needed:.2f}'} |")
    (args.out / "soft-vs-mean.json").write_text(json.dumps({"plain": plain, "rows": rows}, indent=2) + "\n")
    print(f"→ {args.out / 'soft-vs-mean.json'}")


def _reward_at_kl(curve: list[tuple[float, float]], kl: float) -> float | None:
    """The reward of a (KL, reward) curve at ``kl``, joined by straight lines; None beyond its largest KL."""
    curve = sorted(curve)
    for (k0, r0), (k1, r1) in zip(curve, curve[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1
    return None


if __name__ == "__main__":
    main()
