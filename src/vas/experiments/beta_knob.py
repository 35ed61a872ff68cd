"""β as a control knob (paper Fig. 5 and Table 6): verbosity reward on the App. C.5.4 topic prompts.

One value model is trained on π0's responses to the topic prompts, rewarded by their length in words
(``verbosity`` = words/100). At decoding time only β changes: the mean length of the responses to held-out
topics is measured over a grid of β, negative β included (which steers towards low reward, i.e. short
responses). The paper's claim is a monotone curve.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vas.experiments.report import Section, markdown_text, pyplot, save_figure
from vas.pipeline import Recipe

NAME = "beta-knob"
REWARD = "verbosity"
ISSUE_GRID_LIMIT = 8.0  # the issue's β grid: 0, 0.5, 1, 2, 4, 8 and their negatives


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 20 minutes on 2 CPU cores).

    β multiplies V, which is in the reward's units (words / 100): the issue's grid (0 … 8 and its negatives)
    is extended to ±64 so that the KL spans several nats, whatever the curve turns out to be.
    """

    train_topics: int = 60
    eval_topics: int = 20
    recipe: Recipe = Recipe(samples_per_prompt=6, max_new_tokens=128, batch_size=20, backbone_layers=8)
    top_k: int = 10
    betas: tuple[float, ...] = (-64.0, -16.0, -8.0, -4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
    example_betas: tuple[float, ...] = (-16.0, 0.0, 16.0)


QUICK = Size(train_topics=6, eval_topics=3, recipe=Recipe(samples_per_prompt=2, max_new_tokens=12, epochs=1.0, batch_size=6),
             betas=(-4.0, 0.0, 4.0))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation of two equally long lists without ties in ``x`` (ties in ``y`` get mean ranks)."""
    def ranks(values):
        t = torch.tensor(values, dtype=torch.float64)
        return torch.stack([((t < v).sum() + ((t == v).sum() + 1) / 2) for v in t])

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else 0.0


def significant_decreases(rows: list[dict]) -> list[tuple[float, float]]:
    """Adjacent β pairs (in increasing β) whose mean length drops by more than 2 standard errors of the difference."""
    rows = sorted(rows, key=lambda r: r["beta"])
    drops = []
    for a, b in zip(rows, rows[1:]):
        if a["words"] - b["words"] > 2 * math.hypot(a["words_sem"], b["words_sem"]):
            drops.append((a["beta"], b["beta"]))
    return drops


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    rows = sorted(rows, key=lambda r: r["beta"])
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    ax.errorbar([r["beta"] for r in rows], [r["words"] for r in rows], yerr=[r["words_sem"] for r in rows],
                marker="o", capsize=3)
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks([r["beta"] for r in rows], [f"{r['beta']:g}" for r in rows])
    ax.set_xlabel("β (symmetric log scale)")
    ax.set_ylabel("mean words per response")
    ax.set_title(f"Verbosity value model, β as a knob ({rows[0]['prompts']} held-out topics, ±1 s.e.)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) the verbosity value model in ``out``, sweep β on held-out topics, write
    ``summary.json``, ``generations.csv`` and ``words_vs_beta.png`` there, and return the report section."""
    from vas.evaluate import standard_error
    from vas.experiments.setup import Setup
    from vas.pipeline import samples_and_value_model
    from vas.prompts import load_prompts
    from vas.rewards import word_count
    from vas.decoding.loop import Steering
    from vas.storage import write_json_atomic, write_text_atomic

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    recipe = size.recipe
    data, value_dir = samples_and_value_model(
        out, policy=setup.policy, tokenizer=setup.tokenizer, base_model=base_model,
        prompts=load_prompts("topics", limit=size.train_topics), reward_spec=REWARD, recipe=recipe, seed=seed,
        device=device, progress=progress, log=log, metadata={"prompts": "topics"},
    )
    value_model = setup.load_value_model(value_dir)
    held_out = load_prompts("topics", start=size.train_topics, limit=size.eval_topics)

    def words_of(prompts, responses):
        return torch.tensor([float(word_count(r)) for r in responses])

    rows, generations = [], []
    for beta in size.betas:
        steering = Steering([value_model], beta=beta, top_k=size.top_k) if beta != 0 else None  # β = 0 is π0
        result = setup.responses(out / "betas" / f"beta{beta:g}.json", held_out, steering, {"words": words_of},
                                 samples_per_prompt=1, max_new_tokens=recipe.max_new_tokens,
                                 batch_size=recipe.batch_size, desc=f"β={beta:g}")
        words, tokens = torch.tensor(result["words"]), torch.tensor(result["tokens"])
        rows.append({"beta": beta, "prompts": len(held_out), "words": float(words.mean()),
                     "words_sem": standard_error(words), "tokens": float(tokens.mean()),
                     "kl": sum(result["kl"]) / len(result["kl"]),
                     "at_token_limit": float((tokens >= recipe.max_new_tokens).float().mean()),
                     "seconds_per_prompt": result["seconds_per_response"]})
        generations += [{"beta": beta, "prompt": p, "response": t, "words": int(w)}
                        for p, t, w in zip(held_out, result["texts"], words)]
        log(f"β={beta:g}: {rows[-1]['words']:.1f} ± {rows[-1]['words_sem']:.1f} words, KL {rows[-1]['kl']:.2f}")

    rho = spearman([r["beta"] for r in rows], [r["words"] for r in rows])
    drops = significant_decreases(rows)
    small = [r for r in rows if abs(r["beta"]) <= ISSUE_GRID_LIMIT]
    rho_small = spearman([r["beta"] for r in small], [r["words"] for r in small]) if len(small) > 1 else float("nan")
    train_words = float(torch.tensor([word_count(t) for t in data["response"]], dtype=torch.float32).mean())
    summary = {"settings": {"base_model": base_model, "reward": REWARD, "seed": seed, "top_k": size.top_k,
                            "train_topics": size.train_topics, "samples_per_prompt": recipe.samples_per_prompt,
                            "eval_topics": size.eval_topics, "max_new_tokens": recipe.max_new_tokens},
               "train_mean_words": train_words, "rows": rows, "spearman": rho, "significant_decreases": drops,
               "spearman_small_beta": rho_small,
               "example": {"prompt": held_out[0], "responses": [g for g in generations if g["prompt"] == held_out[0]
                                                                and g["beta"] in size.example_betas]}}
    write_json_atomic(out / "summary.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["beta", "prompt", "response", "words"])
    writer.writeheader()
    writer.writerows(generations)
    write_text_atomic(out / "generations.csv", buffer.getvalue())
    plot(rows, out / "words_vs_beta.png")

    return [section(summary, size)]


def section(summary: dict, size: Size) -> Section:
    """The report section of a finished run's ``summary`` (what :func:`run` wrote to ``summary.json``)."""
    rows, drops, rho, rho_small = (summary["rows"], summary["significant_decreases"], summary["spearman"],
                                   summary["spearman_small_beta"])
    recipe, train_words = size.recipe, summary["train_mean_words"]
    small = [r for r in rows if abs(r["beta"]) <= ISSUE_GRID_LIMIT]
    example_prompt, example_rows = summary["example"]["prompt"], summary["example"]["responses"]
    monotone = not drops
    verdict = "reproduced" if monotone and rho >= 0.9 else "partly reproduced" if rho >= 0.5 else "not reproduced"
    table = "\n".join(
        f"| {r['beta']:g} | {r['words']:.1f} ± {r['words_sem']:.1f} | {r['tokens']:.1f} | {100 * r['at_token_limit']:.0f} % "
        f"| {r['kl']:.2f} |" for r in sorted(rows, key=lambda r: r["beta"]))
    examples = "\n".join(f"| {g['beta']:g} | {g['words']} | {markdown_text(g['response'])} |" for g in example_rows)
    reasons = []
    if drops:
        reasons.append("Length falls significantly between β = " + ", ".join(f"{a:g} → {b:g}" for a, b in drops))
    if max(r["at_token_limit"] for r in rows) > 0.5:
        reasons.append(f"More than half the responses hit the {recipe.max_new_tokens}-token limit at some β, which "
                       "caps the length the knob can reach")
    body = f"""`vas experiment {NAME}`: a value model for `{REWARD}` (words/100) trained on {size.train_topics} topics ×
{recipe.samples_per_prompt} π0 responses (mean {train_words:.1f} words, ≤ {recipe.max_new_tokens} tokens, TD(λ) λ = 0.95,
{recipe.epochs:g} epoch(s)); VAS with k = {size.top_k} on {size.eval_topics} held-out topics, one response each per β, same
seeds for every β. β = 0 is plain sampling from π0.

| β | words per response | tokens | at the token limit | KL(π‖π0) nats |
|---|---|---|---|---|
{table}

![words vs β]({NAME}/words_vs_beta.png)

Spearman rank correlation between β and mean length: **{rho:.2f}**; adjacent β steps where the length drops
by more than 2 standard errors: {len(drops)}.{(" " + ". ".join(reasons) + ".") if reasons else ""}

Units: V is in the reward's units (words / 100), so β·V changes a token's log-probability by β/100 nats per
word of expected length; the paper does not give its verbosity reward's scale. On the issue's grid alone
(|β| ≤ {ISSUE_GRID_LIMIT:g}) the KL stays at or below {max(r['kl'] for r in small):.2f} nats and ρ = {rho_small:.2f}; the grid is
extended to ±{max(abs(r['beta']) for r in rows):g} so that the knob's whole range shows.

Responses to “{example_prompt.splitlines()[-1]}” (Table 6 analogue):

| β | words | response |
|---|---|---|
{examples}

Data: `{NAME}/summary.json`, `{NAME}/generations.csv`."""
    return Section(NAME, "β as a control knob (Fig. 5, Table 6)",
                    "With one verbosity value model, the response length is a monotone function of β, "
                   "for positive and negative β alike.", verdict, body)
