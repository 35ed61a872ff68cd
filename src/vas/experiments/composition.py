"""Composing value models at inference (paper Sec. 4.2): positivity and brevity.

Two value models are trained separately on the same π0 samples (the stage shared with the ablations and value-heads experiments, re-scored for brevity),
and combined at decoding time as π ∝ π0 · exp(β · (w₁V_positivity + w₂V_brevity)) with equal weights,
against each alone and against plain sampling. The claim is that both rewards improve together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vas.experiments import frontier
from vas.experiments.report import (
    Section,
    markdown_text,
    paired_difference,
    pyplot,
    save_figure,
)
from vas.pipeline import Recipe

NAME = "composition"
REWARDS = ("positivity", "brevity")
PROMPTS = frontier.PROMPTS


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 25 minutes on 2 CPU cores, the shared stage included)."""

    train_prompts: int = 256  # the value-heads experiment's collection, shared with it
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    eval_prompts: int = 48
    samples_per_prompt: int = 3
    betas: tuple[float, ...] = (4.0, 8.0)
    weights: tuple[float, float] = (1.0, 1.0)
    top_k: int = 10
    batch_size: int = 16


QUICK = Size(train_prompts=frontier.QUICK.train_prompts, recipe=frontier.QUICK.recipe, eval_prompts=3,
             samples_per_prompt=2, betas=(4.0,), batch_size=8)


def improves(delta: float, sem: float) -> bool:
    """A paired difference above two standard errors."""
    return delta > 2 * sem


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) both value models, decode plain / each alone / both at each β (kept in
    ``out/conditions/``), write ``summary.json`` and ``composition.png``, and return the report section."""
    from vas.evaluate import standard_error
    from vas.experiments.setup import Setup
    from vas.prompts import load_prompts
    from vas.rewards import load_reward, score
    from vas.decoding.loop import Steering
    from vas.storage import write_json_atomic

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    data, stage = setup.samples(PROMPTS, size.train_prompts, size.recipe, frontier.REWARD)
    value_models = [setup.load_value_model(setup.value_model(stage, data, reward, size.recipe)) for reward in REWARDS]
    rewards = {name: load_reward(name) for name in REWARDS}
    held_out = load_prompts(PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    common = dict(samples_per_prompt=size.samples_per_prompt, max_new_tokens=size.recipe.max_new_tokens,
                  batch_size=size.batch_size)

    runs = {"plain": setup.responses(out / "conditions" / "plain.json", held_out, None, rewards, desc="plain π0", **common)}
    mixes = {"positivity alone": (1.0, 0.0), "brevity alone": (0.0, 1.0), "both (equal weights)": size.weights}
    for beta in size.betas:
        for label, weights in mixes.items():
            used = [(m, w) for m, w in zip(value_models, weights) if w != 0]
            steering = Steering([m for m, _ in used], [w for _, w in used], beta=beta, top_k=size.top_k)
            key = f"{label}, β={beta:g}"
            slug = label.split()[0] + f"-beta{beta:g}"
            runs[key] = setup.responses(out / "conditions" / f"{slug}.json", held_out, steering, rewards, desc=key, **common)
            log(f"{key}: " + ", ".join(f"{n} {sum(runs[key][n]) / len(held_out):.3f}" for n in REWARDS))

    plain = {n: torch.tensor(runs["plain"][n]) for n in REWARDS}
    rows = []
    for key, result in runs.items():
        row = {"condition": key, "kl": sum(result["kl"]) / len(result["kl"]),
               "tokens": sum(result["tokens"]) / len(result["tokens"]),
               "seconds_per_response": result["seconds_per_response"]}
        for n in REWARDS:
            values = torch.tensor(result[n])
            row[n], row[f"{n}_sem"] = float(values.mean()), standard_error(values)
            row[f"{n}_delta"], row[f"{n}_delta_sem"] = paired_difference(values, plain[n])
        rows.append(row)
    examples = [{"condition": key, "response": result["texts"][0]} for key, result in runs.items()]
    summary = {"settings": {"betas": list(size.betas), "weights": list(size.weights), "top_k": size.top_k,
                            "eval_prompts": size.eval_prompts, "samples_per_prompt": size.samples_per_prompt,
                            "seed": seed},
               "rows": rows, "example_prompt": held_out[0], "examples": examples,
               "training_reward_std": {n: float(score(r, data["prompt"], data["response"]).std()) for n, r in rewards.items()}}
    write_json_atomic(out / "summary.json", summary)
    plot(summary, out / "composition.png")
    return [section(summary, size)]


def plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.8), dpi=120)
    markers = {"plain": "*", "positivity": "o", "brevity": "s", "both": "D"}
    for row in summary["rows"]:
        marker = markers[row["condition"].split()[0]]
        ax.errorbar([row["brevity"]], [row["positivity"]], xerr=[row["brevity_sem"]], yerr=[row["positivity_sem"]],
                    marker=marker, markersize=11 if marker == "*" else 7, capsize=3, linestyle="none",
                    color="black" if marker == "*" else None)
        ax.annotate(row["condition"], (row["brevity"], row["positivity"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    ax.set_xlabel("brevity reward (− words / 100; right = shorter)")
    ax.set_ylabel("positivity reward (VADER)")
    ax.set_title("Two value models composed at inference (±1 s.e.)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def section(summary: dict, size: Size) -> Section:
    rows = summary["rows"]

    def line(r):
        return (f"| {r['condition']} | {r['positivity']:.3f} ± {r['positivity_sem']:.3f} | {r['positivity_delta']:+.3f} ± "
                f"{r['positivity_delta_sem']:.3f} | {r['brevity']:.3f} ± {r['brevity_sem']:.3f} | {-100 * r['brevity']:.1f} | "
                f"{r['brevity_delta']:+.3f} ± {r['brevity_delta_sem']:.3f} | {r['kl']:.2f} |")

    both = [r for r in rows if r["condition"].startswith("both")]
    together = [r for r in both if improves(r["positivity_delta"], r["positivity_delta_sem"])
                and improves(r["brevity_delta"], r["brevity_delta_sem"])]
    some = [r for r in both if improves(r["positivity_delta"], r["positivity_delta_sem"])
            or improves(r["brevity_delta"], r["brevity_delta_sem"])]
    worse = [r for r in both if r["positivity_delta"] < -2 * r["positivity_delta_sem"]
             or r["brevity_delta"] < -2 * r["brevity_delta_sem"]]
    verdict = ("reproduced" if together else "partly reproduced" if some else "not reproduced" if worse
               else "inconclusive")
    if together:
        finding = ("Both rewards improve together (each by more than two paired standard errors) at β = "
                   + ", ".join(f"{r['condition'].split('β=')[1]}" for r in together) + ".")
    elif some:
        finding = ("The combination improves only one of the two rewards significantly at each β: the other is "
                   "within noise of plain sampling, or traded away.")
    elif worse:
        finding = "Neither reward improves significantly with the combination, and one gets significantly worse."
    else:
        finding = "Neither reward moves by more than two standard errors with the combination."
    examples = "\n".join(f"| {e['condition']} | {markdown_text(e['response'])} |" for e in summary["examples"])
    body = f"""`vas experiment {NAME}`: a positivity value model (the ablations' reference) and a brevity value model (brevity =
− words / 100) trained separately with the same recipe on the same π0 samples, re-scored. Decoding on
{size.eval_prompts} held-out chitchat openings × {size.samples_per_prompt} samples (same seeds in every condition), k = {size.top_k},
weights {size.weights[0]:g} : {size.weights[1]:g} for “both”. Δ is the paired difference from plain sampling (± s.e. over prompts).

| condition | positivity | Δ positivity | brevity | words | Δ brevity | KL nats |
|---|---|---|---|---|---|---|
{chr(10).join(line(r) for r in rows)}

![composition]({NAME}/composition.png)

{finding} The two rewards are on different scales: over π0's training responses their standard deviations are
{summary['training_reward_std']['positivity']:.3f} (positivity) and {summary['training_reward_std']['brevity']:.3f} (brevity), and each value model's
differences between candidate tokens scale with them, so equal weights do not mean an equal pull.

First sample for “{markdown_text(summary['example_prompt'])}”:

| condition | response |
|---|---|
{examples}

Data: `{NAME}/summary.json`, every response in `{NAME}/conditions/`."""
    return Section(NAME, "Composing two value models at inference (Sec. 4.2)",
                   "Two value models trained separately (positivity, brevity) and added with equal weights at "
                   "inference improve both rewards together over plain sampling.", verdict, body)
