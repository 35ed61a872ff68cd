"""Value heads on the frontier's task: how much of the reward each head explains, and what it does to VAS's
reward–KL frontier, with soft values (Q_β, the KL-optimal guide) and without.

The frontier's task, on the data the composition and ablations experiments share (π0's responses to the same
training openings, the shared stage), one recipe, one value model per head (:mod:`vas.value.heads`): ``last`` (the paper's), ``mean``,
``distributional`` and ``next`` (every next token's value from one hidden state, one value-model token per
step); the mean head is also trained over prompt and response (``mean-all``), whose R² tells whether the prompt
belongs in the mean. Each is scored by

* R² at finished states: 1 − MSE(V(s_T), r) / Var(r) over the validation responses the training held out;
* R² against App. C.1's halfway labels (held-out π0 responses cut halfway, π0 completions' mean reward);
* VAS's reward and exact KL on held-out openings over a β grid (``frontier_heads``), next to Best-of-N (from one
  pool of π0 samples) and, for the distributional head, the same with soft values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vas.experiments.report import Section, pyplot, reaches, save_figure
from vas.pipeline import Recipe

NAME = "value-heads"
REWARD = "positivity"
PROMPTS = "chitchat"


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 45 minutes on 2 CPU cores, the shared stage included; the
    collection and the ``last`` head are shared with the composition and ablations experiments, so after either it
    takes less)."""

    train_prompts: int = 256
    eval_prompts: int = 32
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    heads: tuple[str, ...] = ("last", "mean", "mean-all", "distributional", "next")
    frontier_heads: tuple[str, ...] = ("last", "mean", "distributional", "next")
    bins: int = 51
    top_k: int = 10
    betas: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    vas_samples_per_prompt: int = 2
    batch_size: int = 16
    completions: int = 10
    reference_n: int = 8
    aim_explained: float = 0.5
    aim_kl_factor: float = 3.0


QUICK = Size(train_prompts=8, eval_prompts=3, recipe=Recipe(samples_per_prompt=2, max_new_tokens=8, epochs=1.0,
                                                            batch_size=8, backbone_layers=1),
             heads=("last", "mean-all", "distributional", "next"), frontier_heads=("last", "distributional", "next"), bins=11, betas=(4.0,), best_of=(1, 2), vas_samples_per_prompt=1, batch_size=8, completions=2,
             reference_n=2)


def recipe_for(head: str, size: Size) -> Recipe:
    """The training recipe of one head (``mean-all``: the mean head over prompt and response)."""
    if head == "mean-all":
        return replace(size.recipe, head="mean", mean_over="all")
    return replace(size.recipe, head=head, bins=size.bins) if head == "distributional" else replace(size.recipe, head=head)


def finished_labels(data, seed: int, val_fraction: float = 0.1):
    """The validation responses the training held out (same split), as states whose label is their reward."""
    from vas.experiments.validation import HalfwayLabels
    from vas.value.train import split_by_prompt

    _, val = split_by_prompt(data, val_fraction, seed)
    rewards = torch.tensor(val["reward"], dtype=torch.float32)
    return HalfwayLabels([list(p) for p in val["prompt_ids"]], [list(r) for r in val["response_ids"]], rewards,
                         torch.zeros_like(rewards))


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) one value model per head, measure R² and VAS's frontier per head, write ``summary.json``
    and ``value_heads.png`` to ``out`` and return the report's section."""
    import json

    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate, saved_optimum
    from vas.experiments.ablations import held_out_labels
    from vas.experiments.setup import Setup
    from vas.experiments.validation import value_mse
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.storage import write_json_atomic

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    data, stage = setup.samples(PROMPTS, size.train_prompts, size.recipe, REWARD)
    held_out = load_prompts(PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    reward = load_reward(REWARD)
    halfway = held_out_labels(setup, held_out, reward, size, out / "halfway_labels.json")
    finished = finished_labels(data, seed)
    policy = LocalPolicy(setup.policy, setup.tokenizer)
    heads, pool = [], None
    for head in size.heads:
        directory = setup.value_model(stage, data, REWARD, recipe_for(head, size))
        model = setup.load_value_model(directory)
        pad = setup.tokenizer.pad_token_id
        entry = {"head": head, "finished": value_mse(model, finished, pad), "halfway": value_mse(model, halfway, pad),
                 "runs": {}}
        kinds = ((False, True) if model.kind == "distributional" else (False,)) if head in size.frontier_heads else ()
        for soft in kinds:
            name = f"{head}-soft" if soft else head
            eval_dir = out / "eval" / name
            if (eval_dir / "report.json").is_file():
                log(f"evaluation: reusing {eval_dir}")
                report = json.loads((eval_dir / "report.json").read_text())
            else:  # Best-of-N's pool is drawn once, with the first head; the others draw one plain sample
                config = EvaluateConfig(betas=size.betas, top_k=size.top_k,
                                        best_of=size.best_of if pool is None else (1,),
                                        vas_samples_per_prompt=size.vas_samples_per_prompt, soft=soft,
                                        max_new_tokens=size.recipe.max_new_tokens, batch_size=size.batch_size,
                                        seed=seed)
                report = evaluate(policy, held_out, reward, [model], eval_dir, config, progress=progress,
                                  metadata={"reward": REWARD, "base_model": base_model, "prompt_source": PROMPTS,
                                            "head": name})
            if pool is None:
                pool = report if report.get("optimum") else {**report, "optimum": saved_optimum(eval_dir)}
            entry["runs"]["soft" if soft else "mean"] = report["vas"]
        heads.append(entry)
        del model
    summary = {"heads": heads, "plain": pool["plain"], "best_of_n": pool["best_of_n"], "optimum": pool["optimum"],
               "validation_rows": len(finished.labels),
               "reward_variance": float(torch.tensor(data["reward"]).var(unbiased=False)), "train_rows": len(data)}
    write_json_atomic(out / "summary.json", summary)
    plot(summary, out / "value_heads.png", size)
    return [section(summary, size)]


def label(head: str, soft: bool) -> str:
    return f"{head}, soft Q_β" if soft else head


def plot(summary: dict, path: Path, size: Size) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13.0, 4.6), dpi=110, gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    bon = summary["best_of_n"]
    ax.errorbar([b["kl"] for b in bon], [b["reward"] for b in bon], yerr=[b["reward_sem"] for b in bon], marker="s",
                color="black", capsize=3, label="Best-of-N (KL: bound)")
    for b in bon:
        ax.annotate(f"N={b['n']}", (b["kl"], b["reward"]), textcoords="offset points", xytext=(4, -11), fontsize=8)
    if summary.get("optimum"):
        points = summary["optimum"]["points"]
        ax.plot([p["kl"] for p in points], [p["reward"] for p in points], color="grey", linestyle="--",
                label=f"KL-optimal π0·exp(r/α)/Z (estimate; KL ≤ log M = {summary['optimum']['kl_cap']:.2f})")
    for entry in summary["heads"]:
        for kind, runs in entry["runs"].items():
            runs = sorted(runs, key=lambda v: v["beta"])
            ax.errorbar([v["kl"] for v in runs], [v["reward"] for v in runs],
                        yerr=[v["reward_sem"] for v in runs], marker="o", capsize=2,
                        linestyle="--" if kind == "soft" else "-", label=f"VAS, {label(entry['head'], kind == 'soft')}")
    reference = next((b for b in bon if b["n"] == size.reference_n), None)
    if reference is not None:
        ax.axhline(reference["reward"], color="grey", linestyle=":", linewidth=0.8)
        ax.axvline(size.aim_kl_factor * reference["kl"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set_xlim(left=-0.02)  # KL ≥ 0: no autoscaled negative decades
    ax.set_xlabel(f"KL(π ‖ π0) per response [nats], log scale above 0.5 (dotted: Best-of-{size.reference_n}'s "
                  f"reward, {size.aim_kl_factor:g}× its KL bound)")
    ax.set_ylabel("mean positivity (VADER), held-out prompts")
    ax.set_title("Reward vs KL per value head (β grid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    names = [e["head"] for e in summary["heads"]]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [e["finished"]["explained"] for e in summary["heads"]], width=0.4,
           label="finished states (validation)")
    ax.bar([i + 0.2 for i in x], [e["halfway"]["explained"] for e in summary["heads"]], width=0.4,
           label="halfway states (App. C.1 labels)")
    ax.axhline(size.aim_explained, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("R² (share of the variance explained)")
    ax.set_title("How much of the reward each head explains")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def section(summary: dict, size: Size) -> Section:
    """The report's section: R² and frontier per head, and the aim's verdict from the measured numbers alone."""
    bon = {b["n"]: b for b in summary["best_of_n"]}
    reference = bon.get(size.reference_n) or bon[max(bon)]
    kl_limit = size.aim_kl_factor * reference["kl"]
    rows, best = head_rows(summary, size, reference)
    explained = max(summary["heads"], key=lambda e: e["finished"]["explained"])
    aim_r2 = explained["finished"]["explained"] >= size.aim_explained
    aim_kl = best is not None and best[2]["kl"] <= kl_limit
    verdict = "reproduced" if aim_r2 and aim_kl else "partly reproduced" if aim_r2 or aim_kl else "not reproduced"
    findings = [f"The head that explains most is `{explained['head']}`: {explained['finished']['explained']:.0%} of the "
                f"reward's variance at finished states (aim: {size.aim_explained:.0%}) and "
                f"{explained['halfway']['explained']:.0%} at halfway states"] + window_findings(summary)
    findings += frontier_findings(summary, size, reference, best) + soft_findings(summary)
    if not (aim_r2 and aim_kl):
        findings.append(shortfall(summary, size))
    findings.append(f"Decoding time per generated token (batch {size.batch_size}, mean over the β grid; against `last`): "
                    + decoding_costs(summary))
    head_rows_text = "\n".join(rows)
    beta_header = " | ".join(f"β={b:g}" for b in size.betas)
    optimum_note = optimum_sentence(summary, size, reference)
    body = f"""`vas experiment {NAME}`: the frontier's task on the shared data ({summary['train_rows']} π0 responses to {size.train_prompts} chitchat
openings, VADER positivity), one value model per head, same recipe ({size.recipe.backbone_layers or 'all'} of π0's layers, LoRA r = {size.recipe.lora_rank},
TD(λ) λ = {size.recipe.lam:g}, {size.recipe.epochs:g} epochs; the distributional head has {size.bins} atoms over the training
rewards' range and is trained by cross-entropy on distributional λ-returns). R²: the share of the variance
explained, at the finished validation responses (their reward) and at App. C.1's halfway states of
{size.eval_prompts} held-out responses ({size.completions} π0 completions each). VAS on {size.eval_prompts} held-out openings, k = {size.top_k},
{size.vas_samples_per_prompt} samples per prompt, exact KL; Best-of-N from a pool of {max(size.best_of)} π0 samples per prompt
(Best-of-{reference['n']}: {reference['reward']:.3f} ± {reference['reward_sem']:.3f}, KL ≤ {reference['kl']:.2f}; plain π0
{summary['plain']['reward']:.3f}). Cells: reward ± s.e. (KL nats; KL overhead: the KL divided by the KL the KL-optimal policy
π0·exp(r/α)/Z needs for that reward, estimated on the same pool, where defined).{optimum_note}

| head | R² finished | R² halfway | {beta_header} |
|---|---|---|{'---|' * len(size.betas)}
{head_rows_text}

![value heads]({NAME}/value_heads.png)

{". ".join(findings)}.

Data: `{NAME}/summary.json`, each head's evaluation in `{NAME}/eval/`."""
    return Section(NAME, "Value heads and soft values (beyond the paper: Sec. 3.3's head, Q# soft values)",
                   f"A value head that reads more of the state explains at least {size.aim_explained:.0%} of the "
                   f"reward's variance at finished states, and VAS guided by the best head reaches Best-of-"
                   f"{size.reference_n}'s reward at no more than {size.aim_kl_factor:g}× Best-of-{size.reference_n}'s "
                   "KL bound (this project's aim, not a claim of the paper).", verdict, body)


def head_rows(summary: dict, size: Size, reference: dict) -> tuple[list[str], tuple | None]:
    """The table's rows, one per head and kind of value (a head without VAS runs: its R² only), and the lowest-KL
    VAS point that reaches ``reference``'s reward (:func:`vas.experiments.report.reaches`) as (head, kind, point),
    or None."""
    from vas.evaluate import kl_overhead

    def overhead(v):  # the KL overhead against the optimum's estimate, where defined
        x = kl_overhead(v["kl"], v["reward"], summary["optimum"]) if summary.get("optimum") else None
        return "" if x is None else f"; {x:.1f}×"

    rows, best = [], None
    for entry in summary["heads"]:
        if not entry["runs"]:
            rows.append(f"| {entry['head']} | {entry['finished']['explained']:.0%} | {entry['halfway']['explained']:.0%} | "
                        + " | ".join("—" for _ in size.betas) + " |")
        for kind, runs in entry["runs"].items():
            points = " | ".join(f"{v['reward']:.3f} ± {v['reward_sem']:.3f} ({v['kl']:.1f}{overhead(v)})"
                                for v in sorted(runs, key=lambda v: v["beta"]))
            rows.append(f"| {label(entry['head'], kind == 'soft')} | {entry['finished']['explained']:.0%} | "
                        f"{entry['halfway']['explained']:.0%} | {points} |")
            for v in runs:
                if reaches(v, reference) and (best is None or v["kl"] < best[2]["kl"]):
                    best = (entry["head"], kind, v)
    return rows, best


def window_findings(summary: dict) -> list[str]:
    """The mean head's window: response only (``mean``) against prompt and response (``mean-all``), where both
    were trained (else no finding)."""
    mean_heads = {e["head"]: e for e in summary["heads"] if e["head"] in ("mean", "mean-all")}
    if len(mean_heads) != 2:
        return []
    a, b = mean_heads["mean"]["finished"]["explained"], mean_heads["mean-all"]["finished"]["explained"]
    return [f"Averaging over the response only (`mean`) explains {a:.0%} at finished states; including the "
            f"prompt (`mean-all`) {b:.0%}, so "
            + ("the response-only window stays the default" if a >= b else
               "the prompt helps here, though `response` stays the default")]


def frontier_findings(summary: dict, size: Size, reference: dict, best: tuple | None) -> list[str]:
    """Where the heads' frontiers stand against ``reference`` (Best-of-N): the lowest-KL point that reaches its
    reward (``best``, from :func:`head_rows`) against the aim's KL limit, and the best point within that limit."""
    kl_limit = size.aim_kl_factor * reference["kl"]
    if best is not None:
        findings = [f"The lowest-KL VAS point that reaches Best-of-{reference['n']}'s reward ({reference['reward']:.3f}, "
                    f"within two standard errors) is the {label(best[0], best[1] == 'soft')} head at β={best[2]['beta']:g}: "
                    f"{best[2]['reward']:.3f} at KL {best[2]['kl']:.2f} (aim: ≤ {kl_limit:.2f}, "
                    f"{size.aim_kl_factor:g}× Best-of-{reference['n']}'s bound)"]
    else:
        findings = [f"No head reaches Best-of-{reference['n']}'s reward ({reference['reward']:.3f}) at any β of the grid"]
    low_kl = [(e["head"], kind, v) for e in summary["heads"] for kind, runs in e["runs"].items() for v in runs
              if v["kl"] <= kl_limit]
    if low_kl:
        head, kind, v = max(low_kl, key=lambda t: t[2]["reward"])
        findings.append(f"Within {kl_limit:.2f} nats the best point is the {label(head, kind == 'soft')} head at "
                        f"β={v['beta']:g}: {v['reward']:.3f} at KL {v['kl']:.2f}")
    return findings


def soft_findings(summary: dict) -> list[str]:
    """Soft values against the point value of the same (distributional) head, per β: at the same β and at the
    nearest KL; and, where the soft guide moves much less far from π0, why."""
    notes = []
    for entry in summary["heads"]:
        if "soft" in entry["runs"]:
            means = entry["runs"]["mean"]
            for s in sorted(entry["runs"]["soft"], key=lambda v: v["beta"]):
                m = next(m for m in means if m["beta"] == s["beta"])
                near = min(means, key=lambda m: abs(math.log((m["kl"] + 0.05) / (s["kl"] + 0.05))))
                notes.append(f"β={s['beta']:g}: {s['reward']:.3f} ± {s['reward_sem']:.3f} at KL {s['kl']:.2f} "
                             f"(the mean at the same β: {m['reward']:.3f} at KL {m['kl']:.2f}; at the nearest KL, "
                             f"β={near['beta']:g}: {near['reward']:.3f} ± {near['reward_sem']:.3f} at KL {near['kl']:.2f})")
    if not notes:
        return []
    findings = ["Soft values Q_β against the distributional head's value, per β: " + "; ".join(notes)]
    softest = next(e for e in summary["heads"] if "soft" in e["runs"])["runs"]
    if max(v["kl"] for v in softest["soft"]) < 0.5 * max(v["kl"] for v in softest["mean"]):
        findings.append("The soft guide steers less at the same β: as β grows, Q_β is set by the histogram's upper "
                        "tail, which cross-entropy training barely pins down and which also holds the head's own "
                        "error about the reward, alike for every candidate (BENCHMARKS.md, \"Soft values\"; "
                        "compare the points at equal KL, not at equal β)")
    return findings


def shortfall(summary: dict, size: Size) -> str:
    """The likeliest reason the aim falls short, with the R² ranges it rests on."""
    finals = [e["finished"]["explained"] for e in summary["heads"]]
    halves = [e["halfway"]["explained"] for e in summary["heads"]]
    return (f"Likeliest reason for what falls short: at a finished state the value is the reward itself, "
            f"and VADER's score of a reply turns on single words; every head explains "
            f"{min(finals):.0%}–{max(finals):.0%} of it there, but {min(halves):.0%}–{max(halves):.0%} of "
            f"App. C.1's halfway labels, which average {size.completions} completions. The value model is "
            f"also small ({size.recipe.backbone_layers or 'all'} of π0's layers) and its data few "
            f"({summary['train_rows']} responses; the R² at finished states rests on the "
            f"{summary.get('validation_rows', 'held-out')} validation responses)")


def decoding_costs(summary: dict) -> str:
    """Each head's decoding seconds per generated token (mean over its β grid), in ms and against ``last``'s."""
    def seconds_per_token(entry, kind="mean"):
        runs = entry["runs"][kind]
        return sum(v["seconds_per_prompt"] for v in runs) / max(sum(v["length"] for v in runs), 1e-9)

    timed = [e for e in summary["heads"] if e["runs"]]
    last = next((e for e in timed if e["head"] == "last"), timed[0])
    return "; ".join(f"{label(e['head'], kind == 'soft')} {seconds_per_token(e, kind) * 1e3:.1f} ms "
                     f"({seconds_per_token(e, kind) / seconds_per_token(last):.2f}×)"
                     for e in timed for kind in e["runs"])


def optimum_sentence(summary: dict, size: Size, reference: dict) -> str:
    """Where the KL-optimal policy's estimate reaches ``reference``'s reward, and why its overheads are lower
    bounds; empty without an estimate."""
    from vas.evaluate import kl_at_reward

    if not summary.get("optimum"):
        return ""
    optimum_kl = kl_at_reward([(p["kl"], p["reward"]) for p in summary["optimum"]["points"]], reference["reward"])
    return ((f" The optimum's estimate reaches Best-of-{reference['n']}'s reward at KL {optimum_kl:.2f}."
             if optimum_kl is not None else
             f" The optimum's estimate does not reach Best-of-{reference['n']}'s reward.")
            + f" Its KL cannot pass log {max(size.best_of)} = {summary['optimum']['kl_cap']:.2f} nats and at a given "
            "reward it needs more KL than the true optimum, so each KL overhead is a lower bound.")
