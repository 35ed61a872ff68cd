"""Scaling: how much of the reward the value model explains, and what VAS's reward–KL frontier looks like,
as the π0 data it trains on grows.

The frontier's task (chitchat openings, VADER positivity). π0's responses are collected once for the largest
size (through vLLM by default, as ``vas collect --engine vllm`` does) and each smaller size trains on the
responses to a prefix of those prompts, so the sizes are nested. For each size and head (one recipe):

* R² at finished states: 1 − MSE(V(s_T), r) / Var(r) on held-out π0 responses to prompts no size trains on;
* R² against App. C.1's halfway labels (held-out π0 responses cut halfway, π0 completions' mean reward);
* VAS's reward and exact KL on held-out openings over a β grid, beside Best-of-N and the estimated KL-optimal
  policy (:func:`vas.evaluate.optimum_frontier`), both from one pool of π0 samples; from them, the KL VAS
  needs for Best-of-N's reward and for a fixed reward, against Best-of-N's bound and against the optimum's
  KL (:func:`vas.evaluate.kl_at_reward`).

Every stage (the collections, each value model, the halfway labels, each evaluation) is kept and reused, so
an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vas.experiments.report import Section, pyplot, save_figure
from vas.pipeline import Recipe

NAME = "scaling"
REWARD = "positivity"
PROMPTS = "chitchat"


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: at most 90 minutes on 2 CPU cores from an empty folder).

    ``responses``: the π0 responses each value model trains on (a multiple of ``recipe.samples_per_prompt``;
    10 % of the prompts are held out for the training's validation); ``held_out_prompts`` ×
    ``recipe.samples_per_prompt`` held-out responses give the finished-state R²; ``engine`` collects them
    (``vllm`` or ``transformers``) in batches of ``collect_batch_size``; ``reference_n``, ``aim_kl_factor``, ``aim_reward``, ``aim_overhead`` and
    ``aim_explained`` are the aims the section checks.
    """

    responses: tuple[int, ...] = (512, 1536, 4096)
    held_out_prompts: int = 128
    eval_prompts: int = 32
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    heads: tuple[str, ...] = ("last", "distributional")
    bins: int = 51
    engine: str = "vllm"
    collect_batch_size: int = 128
    top_k: int = 10
    betas: tuple[float, ...] = (2.0, 8.0, 32.0)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    vas_samples_per_prompt: int = 2
    batch_size: int = 16
    completions: int = 10
    reference_n: int = 4
    aim_kl_factor: float = 2.0
    aim_reward: float = 0.8
    aim_overhead: float = 3.0
    aim_explained: float = 0.6


QUICK = Size(responses=(8, 16), held_out_prompts=2, eval_prompts=3,
             recipe=Recipe(samples_per_prompt=2, max_new_tokens=8, epochs=1.0, batch_size=8, backbone_layers=1),
             bins=11, engine="transformers", collect_batch_size=8, betas=(4.0,), best_of=(1, 2, 4), vas_samples_per_prompt=1, batch_size=8,
             completions=2, reference_n=2)
LARGE = Size(responses=(1024, 4096, 16384), held_out_prompts=240, eval_prompts=64, recipe=Recipe(samples_per_prompt=4))
"""For a GPU: more data, a full-depth value model, almost twice the held-out prompts (4,400 of the 4,404
chitchat openings in all)."""
SIZES = {"quick": QUICK, "large": LARGE}


def check(size: Size) -> None:
    """Fail in one line before anything runs if the collection engine is not installed or the prompt source is
    too small for the size's training, held-out and evaluation prompts.

    Raises:
        VasError: naming what to install, or how many prompts are missing.
    """
    from vas.errors import VasError
    from vas.prompts import load_prompts

    needed = max(size.responses) // size.recipe.samples_per_prompt + size.held_out_prompts + size.eval_prompts
    available = len(load_prompts(PROMPTS))
    if needed > available:
        raise VasError(f"this size needs {needed} {PROMPTS} prompts (training, held-out and evaluation), the source "
                       f"has {available}")

    if size.engine not in ("vllm", "transformers"):
        raise VasError(f"the scaling experiment collects with 'vllm' or 'transformers', not {size.engine!r}")
    if size.engine == "vllm":
        from vas.serving.server import require_vllm

        require_vllm()


def recipe_for(head: str, size: Size) -> Recipe:
    return replace(size.recipe, head=head, bins=size.bins) if head == "distributional" else replace(size.recipe, head=head)


def finished_states(data):
    """Held-out responses as states whose label is their reward (:class:`vas.experiments.validation.HalfwayLabels`
    with the whole response as the prefix)."""
    from vas.experiments.validation import HalfwayLabels

    rewards = torch.tensor(data["reward"], dtype=torch.float32)
    return HalfwayLabels([list(p) for p in data["prompt_ids"]], [list(r) for r in data["response_ids"]], rewards,
                         torch.zeros_like(rewards))


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Collect (or reuse) the data, train one value model per size and head, measure R² and VAS's frontier for
    each, write ``summary.json`` and ``scaling.png`` to ``out`` and return the report's section."""
    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate, saved_optimum
    from vas.experiments.ablations import held_out_labels
    from vas.experiments.setup import Setup
    from vas.experiments.validation import value_mse
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.storage import write_json_atomic

    if size == LARGE and device.type == "cpu":
        log("note: --size large is meant for a GPU (16,384 responses, full-depth value models); on a CPU it takes "
            "many hours")
    m = size.recipe.samples_per_prompt
    train_prompts = [n // m for n in size.responses]
    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    collection = dict(engine=size.engine, batch_size=size.collect_batch_size)
    data, stage = setup.samples(PROMPTS, max(train_prompts), size.recipe, REWARD, **collection)
    held_out_data, _ = setup.samples(PROMPTS, size.held_out_prompts, size.recipe, REWARD, start=max(train_prompts),
                                     **collection)
    first_eval = max(train_prompts) + size.held_out_prompts
    held_out = load_prompts(PROMPTS, start=first_eval, limit=size.eval_prompts)
    reward = load_reward(REWARD)
    finished = finished_states(held_out_data)
    halfway = held_out_labels(setup, held_out, reward, size, out / "halfway_labels.json")
    policy = LocalPolicy(setup.policy, setup.tokenizer)
    pad = setup.tokenizer.pad_token_id
    runs, pool_dir = [], None
    for prompts, responses in zip(train_prompts, size.responses):
        for head in size.heads:
            directory = setup.value_model(stage, data, REWARD, recipe_for(head, size), prompts=prompts)
            model = setup.load_value_model(directory)
            eval_dir = out / "eval" / f"{responses}-{head}"
            if (eval_dir / "report.json").is_file():
                log(f"evaluation: reusing {eval_dir}")
                report = json.loads((eval_dir / "report.json").read_text())
            else:  # the pool (Best-of-N, the optimum) is drawn once, with the first value model
                config = EvaluateConfig(betas=size.betas, top_k=size.top_k,
                                        best_of=size.best_of if pool_dir is None else (1,),
                                        vas_samples_per_prompt=size.vas_samples_per_prompt,
                                        max_new_tokens=size.recipe.max_new_tokens, batch_size=size.batch_size,
                                        seed=seed)
                report = evaluate(policy, held_out, reward, [model], eval_dir, config, progress=progress,
                                  metadata={"reward": REWARD, "base_model": base_model, "prompt_source": PROMPTS,
                                            "head": head, "responses": responses})
            pool_dir = pool_dir or eval_dir
            runs.append({"responses": responses, "head": head, "train_seconds":
                         model.value_config.get("metrics", {}).get("train_seconds"),
                         "finished": value_mse(model, finished, pad), "halfway": value_mse(model, halfway, pad),
                         "vas": report["vas"]})
            del model
    pool = json.loads((pool_dir / "report.json").read_text())
    optimum = pool.get("optimum") or saved_optimum(pool_dir)
    summary = {"runs": runs, "plain": pool["plain"], "best_of_n": pool["best_of_n"], "optimum": optimum,
               "held_out_responses": len(finished.labels), "halfway_states": len(halfway.labels),
               "collected_responses": len(data), "engine": size.engine}
    write_json_atomic(out / "summary.json", summary)
    plot(summary, out / "scaling.png", size)
    return [section(summary, size)]


def measures(summary: dict, size: Size) -> list[dict]:
    """Per run: the KL VAS needs for Best-of-``reference_n``'s reward (and its ratio to Best-of-N's KL bound), and
    for ``aim_reward`` (and its ratio to the optimum's KL there: the KL overhead); None where out of range."""
    from vas.evaluate import kl_at_reward, method_curves

    reference = reference_best_of_n(summary, size)
    optimum = [(p["kl"], p["reward"]) for p in summary["optimum"]["points"]]
    optimum_kl = kl_at_reward(optimum, size.aim_reward)
    rows = []
    for run in summary["runs"]:
        curve = method_curves({"plain": summary["plain"], "vas": run["vas"], "best_of_n": []})["VAS"]
        at_reference = kl_at_reward(curve, reference["reward"])
        at_aim = kl_at_reward(curve, size.aim_reward)
        rows.append({"responses": run["responses"], "head": run["head"], "kl_at_reference": at_reference,
                     "reference_ratio": None if at_reference is None or not reference["kl"] else at_reference / reference["kl"],
                     "kl_at_aim": at_aim, "optimum_kl_at_aim": optimum_kl,
                     "overhead_at_aim": None if at_aim is None or not optimum_kl else at_aim / optimum_kl})
    return rows


def reference_best_of_n(summary: dict, size: Size) -> dict:
    """Best-of-``reference_n`` from the summary, or the largest N of the pool if ``reference_n`` is not in it."""
    bon = {b["n"]: b for b in summary["best_of_n"]}
    return bon.get(size.reference_n) or bon[max(bon)]


def plot(summary: dict, path: Path, size: Size) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13.0, 4.6), dpi=110, gridspec_kw={"width_ratios": [1, 1.5]})
    ax = axes[0]
    for head, marker in zip(size.heads, "os^v"):
        runs = [r for r in summary["runs"] if r["head"] == head]
        for state, style in (("finished", "-"), ("halfway", "--")):
            ax.plot([r["responses"] for r in runs], [r[state]["explained"] for r in runs], marker=marker,
                    linestyle=style, label=f"{head}, {state} states")
    ax.axhline(size.aim_explained, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(size.responses) / 1.5, max(size.responses) * 1.5)  # set, not autoscaled: R² is NaN on constant rewards
    ax.set_xlabel("π0 responses the value model trains on")
    ax.set_ylabel("R² (share of the reward's variance explained)")
    ax.set_title(f"Value model quality vs data (held out: {summary['held_out_responses']} finished, "
                 f"{summary['halfway_states']} halfway)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    points = summary["optimum"]["points"]
    ax.plot([p["kl"] for p in points], [p["reward"] for p in points], color="black", linestyle="--",
            label=f"KL-optimal π0·exp(r/α)/Z (estimate; KL ≤ log M = {summary['optimum']['kl_cap']:.2f})")
    bon = summary["best_of_n"]
    ax.errorbar([b["kl"] for b in bon], [b["reward"] for b in bon], yerr=[b["reward_sem"] for b in bon], marker="s",
                color="black", capsize=3, label="Best-of-N (KL: bound)")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = dict(zip(size.heads, "o^vD"))  # the head by marker and line style, the data size by colour
    for run in summary["runs"]:
        colour = colours[size.responses.index(run["responses"]) % len(colours)]
        curve = sorted(run["vas"], key=lambda v: v["beta"])
        ax.errorbar([v["kl"] for v in curve], [v["reward"] for v in curve], yerr=[v["reward_sem"] for v in curve],
                    marker=markers[run["head"]], capsize=2, color=colour,
                    linestyle="-" if run["head"] == size.heads[0] else ":",
                    label=f"VAS, {run['head']}, {run['responses']} responses")
    ax.axhline(size.aim_reward, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.5)
    ax.set_xlim(left=-0.02)  # KL ≥ 0: no autoscaled negative decades
    ax.set_xlabel("KL(π ‖ π0) per response [nats], log scale above 0.5")
    ax.set_ylabel("mean positivity (VADER), held-out prompts")
    ax.set_title(f"Reward vs KL (β = {', '.join(f'{b:g}' for b in size.betas)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    save_figure(fig, path)


def _kl(x: float | None) -> str:
    return "out of range" if x is None else f"{x:.2f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}×"


def section(summary: dict, size: Size) -> Section:
    """The report's section, rendered from ``summary.json`` alone: the table per size and head, and the aims'
    verdicts."""
    reference = reference_best_of_n(summary, size)
    rows_measured = measures(summary, size)
    optimum_kl = rows_measured[0]["optimum_kl_at_aim"]
    rows = []
    for run, measured in zip(summary["runs"], rows_measured):
        cells = " | ".join(f"{v['reward']:.3f} ± {v['reward_sem']:.3f} ({v['kl']:.1f})"
                           for v in sorted(run["vas"], key=lambda v: v["beta"]))
        rows.append(f"| {run['responses']} | {run['head']} | {run['finished']['explained']:.0%} | "
                    f"{run['halfway']['explained']:.0%} | {cells} | {_kl(measured['kl_at_reference'])} "
                    f"({_ratio(measured['reference_ratio'])}) | {_kl(measured['kl_at_aim'])} "
                    f"({_ratio(measured['overhead_at_aim'])}) |")
    largest = [r for r in summary["runs"] if r["responses"] == max(size.responses)]
    best_r2 = max(largest, key=lambda r: r["finished"]["explained"])
    ratios = [m["reference_ratio"] for m in rows_measured if m["reference_ratio"] is not None]
    overheads = [m["overhead_at_aim"] for m in rows_measured if m["overhead_at_aim"] is not None]
    aims = [
        (f"finished-state R² ≥ {size.aim_explained:.0%} at the largest size",
         f"{best_r2['finished']['explained']:.0%} ({best_r2['head']})", best_r2["finished"]["explained"] >= size.aim_explained),
        (f"VAS reaches Best-of-{reference['n']}'s reward at ≤ {size.aim_kl_factor:g}× its KL bound",
         f"{min(ratios):.1f}× at best" if ratios else "never reached on the β grid",
         bool(ratios) and min(ratios) <= size.aim_kl_factor),
        (f"VAS's KL overhead at reward {size.aim_reward:g} ≤ {size.aim_overhead:g}× the optimum's",
         f"{min(overheads):.1f}× at best" if overheads else
         ("the optimum's estimate does not reach it" if optimum_kl is None else "VAS does not reach it on the β grid"),
         bool(overheads) and min(overheads) <= size.aim_overhead),
    ]
    met = sum(ok for _, _, ok in aims)
    verdict = "reproduced" if met == len(aims) else "partly reproduced" if met else "not reproduced"
    unmeasurable = optimum_kl is None  # the overhead aim cannot be judged where the optimum's estimate stops short
    aim_rows = "\n".join(f"| {aim} | {value} | {'met' if ok else 'not measurable' if i == 2 and unmeasurable else 'missed'} |"
                         for i, (aim, value, ok) in enumerate(aims))
    by_head = {}
    for run in summary["runs"]:
        by_head.setdefault(run["head"], []).append(run)
    trends = "; ".join(f"`{head}`: " + " → ".join(f"{r['finished']['explained']:.0%}/{r['halfway']['explained']:.0%}"
                                                  for r in runs) for head, runs in by_head.items())
    beta_header = " | ".join(f"β={b:g}" for b in size.betas)
    optimum_note = (f"the optimum's estimate reaches {size.aim_reward:g} at KL {optimum_kl:.2f}" if optimum_kl is not None
                    else f"the optimum's estimate does not reach {size.aim_reward:g} on this pool")
    body = f"""`vas experiment {NAME}`: the frontier's task (chitchat openings, VADER positivity). {summary['collected_responses']} π0 responses
collected once (engine: {summary['engine']}); each size trains on the responses to a prefix of those prompts
({size.recipe.backbone_layers or 'all'} of π0's layers, LoRA r = {size.recipe.lora_rank}, TD(λ) λ = {size.recipe.lam:g}, {size.recipe.epochs:g} epochs, lr {size.recipe.learning_rate:g}; the
distributional head has {size.bins} atoms). R²: the share of the reward's variance explained at the finished states of
{summary['held_out_responses']} held-out π0 responses (prompts no size trains on) and at App. C.1's halfway states of
{summary['halfway_states']} held-out responses ({size.completions} π0 completions each). VAS on {size.eval_prompts} other held-out openings, k = {size.top_k},
{size.vas_samples_per_prompt} samples per prompt, exact KL. Best-of-N and the KL-optimal estimate come from one pool of
{max(size.best_of)} π0 samples per prompt (plain π0 {summary['plain']['reward']:.3f}; Best-of-{reference['n']} {reference['reward']:.3f} at
KL ≤ {reference['kl']:.2f}; {optimum_note}. The estimate is the optimum over the pool: at a given reward it needs more
KL than the true optimum, and never more than log {max(size.best_of)} = {summary['optimum']['kl_cap']:.2f} nats, so its rewards near that cap are
a lower bound on the optimum's and every KL overhead against it is a lower bound).
Cells: reward ± s.e. (KL nats). "KL for Best-of-{reference['n']}'s reward": interpolated along VAS's β curve from
plain sampling, with its ratio to Best-of-{reference['n']}'s KL bound; "KL for {size.aim_reward:g}": the same, with its ratio to
the optimum's KL (the KL overhead); "out of range": no β of the grid reaches it.

| responses | head | R² finished | R² halfway | {beta_header} | KL for Best-of-{reference['n']}'s reward | KL for {size.aim_reward:g} |
|---|---|---|---|{'---|' * len(size.betas)}---|---|
{chr(10).join(rows)}

| aim | measured | |
|---|---|---|
{aim_rows}

R² finished/halfway as the data grows, per head: {trends}.

![scaling]({NAME}/scaling.png)

Data: `{NAME}/summary.json`, each evaluation in `{NAME}/eval/`."""
    return Section(NAME, "Value-model scaling: data size against R² and the reward–KL frontier (beyond the paper)",
                   f"With more π0 data, the value model explains at least {size.aim_explained:.0%} of the reward's "
                   f"variance at finished states, and VAS reaches Best-of-{size.reference_n}'s reward at no more than "
                   f"{size.aim_kl_factor:g}× its KL bound and reward {size.aim_reward:g} at no more than "
                   f"{size.aim_overhead:g}× the KL-optimal policy's KL (this project's aims, not the paper's).",
                   verdict, body)
