"""Ablations (paper App. D.1, D.2 and Table 3) on the frontier's task, positivity of chitchat replies.

* **Value targets** (D.1): value models trained on the same data with TD(λ) (λ = 0.95), TD(0) (λ = 0) and
  Monte-Carlo targets (λ = 1).
* **Tokens outside the top-k** (D.1): Eq. 5's β·mean(V) against masking them (π restricted to the top-k).
* **k** (D.2): k ∈ {5, 10, 20, 50} at a fixed β.
* **Value accuracy against reward** (Table 3): value models trained on 3 training-set sizes; their MSE to
  App. C.1's halfway labels (held-out π0 responses cut halfway, 10 π0 completions each, mean reward)
  against the reward VAS reaches with them.

All conditions decode the same held-out prompts with the same seeds at one β, so each is compared with the
reference (TD(λ), all the data, k = 10, Eq. 5) by a paired per-prompt difference. The collected samples
and the reference value model are shared with the composition and value-heads experiments (under ``stages/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vas.experiments import frontier
from vas.experiments.report import Section, paired_difference, pyplot, save_figure
from vas.pipeline import Recipe

NAME = "ablations"
REWARD = frontier.REWARD
PROMPTS = frontier.PROMPTS


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 30 minutes on 2 CPU cores, the shared stage included)."""

    train_prompts: int = 256  # the value-heads experiment's collection, shared with it
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    data_sizes: tuple[int, ...] = (64, 128, 256)
    target_prompts: int = 64
    eval_prompts: int = 32
    samples_per_prompt: int = 3
    beta: float = 8.0
    top_k: int = 10
    ks: tuple[int, ...] = (5, 20, 50)
    completions: int = 10
    batch_size: int = 16


QUICK = Size(train_prompts=frontier.QUICK.train_prompts, recipe=frontier.QUICK.recipe, data_sizes=(4, 8), target_prompts=4,
             eval_prompts=3, samples_per_prompt=2, ks=(2, 5), completions=2, batch_size=8)


@dataclass(frozen=True)
class Condition:
    """One decoding condition: a value model (by training prompts and λ), k, and Eq. 5 or masking."""

    name: str
    prompts: int
    lam: float
    top_k: int
    masked: bool = False

    @property
    def model_key(self) -> tuple[int, float]:
        return self.prompts, self.lam

    @property
    def slug(self) -> str:
        """File name of the condition's cached responses."""
        return f"prompts{self.prompts}-lam{self.lam:g}-k{self.top_k}" + ("-masked" if self.masked else "")


def conditions(size: Size) -> list[Condition]:
    """The reference first, then every ablated condition."""
    lam = size.recipe.lam
    full = size.train_prompts
    out = [Condition("reference: TD(λ), all data, k={}, Eq. 5".format(size.top_k), full, lam, size.top_k)]
    out += [Condition(f"TD(λ), {size.target_prompts} prompts", size.target_prompts, lam, size.top_k),
            Condition(f"TD(0), {size.target_prompts} prompts", size.target_prompts, 0.0, size.top_k),
            Condition(f"Monte-Carlo, {size.target_prompts} prompts", size.target_prompts, 1.0, size.top_k)]
    out += [Condition(f"TD(λ), {n} prompts", n, lam, size.top_k) for n in size.data_sizes
            if n not in (full, size.target_prompts)]
    out += [Condition(f"masked outside the top-{size.top_k}", full, lam, size.top_k, masked=True)]
    out += [Condition(f"k={k}", full, lam, k) for k in size.ks]
    return out


def verdict_of(claims: list[str]) -> str:
    """Combine sub-claim verdicts: all reproduced → reproduced; all inconclusive → inconclusive; all not
    reproduced (or not reproduced and inconclusive) → not reproduced; otherwise partly reproduced."""
    if all(c == "reproduced" for c in claims):
        return "reproduced"
    if all(c == "inconclusive" for c in claims):
        return "inconclusive"
    if "reproduced" not in claims:
        return "not reproduced"
    return "partly reproduced"


def worse(delta: float, sem: float, kl_delta: float, kl_sem: float) -> str:
    """Verdict for a claim that a condition is worse than the reference on the reward–KL plane, from paired
    differences (condition − reference) of reward (Δ) and KL, each with its standard error, at one β.

    Worse (``reproduced``): lower reward without less KL, or no more reward for more KL. Better (``not
    reproduced``): more reward without more KL, or as much reward for less KL. Anything else, including a
    trade of reward for KL, needs a β grid to decide (``inconclusive``).
    """
    higher, lower = delta > 2 * sem, delta < -2 * sem
    more_kl, less_kl = kl_delta > 2 * kl_sem, kl_delta < -2 * kl_sem
    if (lower and not less_kl) or (not higher and more_kl):
        return "reproduced"
    if (higher and not more_kl) or (not lower and less_kl):
        return "not reproduced"
    return "inconclusive"


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) the ablated value models, label held-out states, decode every condition (each
    condition's responses are kept in ``out/conditions/`` and reused), write ``summary.json`` and
    ``ablations.png``, and return three report sections."""
    from vas.evaluate import standard_error
    from vas.experiments.setup import Setup
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.decoding.loop import Steering
    from vas.storage import write_json_atomic
    from vas.experiments.validation import value_mse

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    data, stage = setup.samples(PROMPTS, size.train_prompts, size.recipe, REWARD)
    reward = load_reward(REWARD)
    held_out = load_prompts(PROMPTS, start=size.train_prompts, limit=size.eval_prompts)

    labels = held_out_labels(setup, held_out, reward, size, out / "halfway_labels.json")

    all_conditions = conditions(size)
    models = {}
    for key in sorted({c.model_key for c in all_conditions}):
        prompts, lam = key
        recipe = replace(size.recipe, lam=lam)
        models[key] = setup.value_model(stage, data, REWARD, recipe, prompts=None if prompts == size.train_prompts else prompts)
    loaded = {key: setup.load_value_model(directory) for key, directory in models.items()}  # decoding's dtype
    accuracy = {key: value_mse(model, labels, setup.tokenizer.pad_token_id) for key, model in loaded.items()}

    results = {}
    for condition in all_conditions:
        steering = Steering([loaded[condition.model_key]], beta=size.beta, top_k=condition.top_k,
                            mask_outside_top_k=condition.masked)
        results[condition.name] = setup.responses(
            out / "conditions" / f"{condition.slug}.json", held_out, steering, {REWARD: reward},
            samples_per_prompt=size.samples_per_prompt, max_new_tokens=size.recipe.max_new_tokens,
            batch_size=size.batch_size, desc=condition.name)
        log(f"{condition.name}: reward {sum(results[condition.name][REWARD]) / len(held_out):.3f}")
    plain = setup.responses(out / "conditions" / "plain.json", held_out, None, {REWARD: reward},
                            samples_per_prompt=size.samples_per_prompt, max_new_tokens=size.recipe.max_new_tokens,
                            batch_size=size.batch_size, desc="plain π0")

    reference = torch.tensor(results[all_conditions[0].name][REWARD])
    reference_kl = torch.tensor(results[all_conditions[0].name]["kl"])
    rows = []
    for condition in all_conditions:
        r = results[condition.name]
        rewards = torch.tensor(r[REWARD])
        delta, delta_sem = paired_difference(rewards, reference)
        kl_delta, kl_delta_sem = paired_difference(torch.tensor(r["kl"]), reference_kl)
        acc = accuracy[condition.model_key]
        rows.append({"condition": condition.name, "prompts": condition.prompts, "lam": condition.lam,
                     "top_k": condition.top_k, "masked": condition.masked,
                     "reward": float(rewards.mean()), "reward_sem": standard_error(rewards),
                     "delta": delta, "delta_sem": delta_sem, "kl": sum(r["kl"]) / len(r["kl"]),
                     "kl_delta": kl_delta, "kl_delta_sem": kl_delta_sem,
                     "tokens": sum(r["tokens"]) / len(r["tokens"]), "seconds_per_response": r["seconds_per_response"],
                     "halfway_mse": acc["mse"], "explained": acc["explained"]})
    plain_rewards = torch.tensor(plain[REWARD])
    n = size.target_prompts
    targets = {}
    for key, name in (("td0_minus_td_lambda", f"TD(0), {n} prompts"),
                      ("monte_carlo_minus_td_lambda", f"Monte-Carlo, {n} prompts")):
        for measure in (REWARD, "kl"):
            targets[f"{key}_{measure}"] = paired_difference(torch.tensor(results[name][measure]),
                                                            torch.tensor(results[f"TD(λ), {n} prompts"][measure]))
    summary = {"settings": {"beta": size.beta, "eval_prompts": size.eval_prompts, "samples_per_prompt": size.samples_per_prompt,
                            "completions": size.completions, "recipe": size.recipe.__dict__, "seed": seed},
               "plain": {"reward": float(plain_rewards.mean()), "reward_sem": standard_error(plain_rewards)},
               "labels": {"mean": float(labels.labels.mean()), "variance": float(labels.labels.var(unbiased=False)),
                          "noise": float(labels.label_variance.mean()), "states": len(labels.labels)},
               "targets": targets, "rows": rows}
    write_json_atomic(out / "summary.json", summary)
    plot(summary, size, out / "ablations.png")
    return sections(summary, size)


def held_out_labels(setup, held_out: list[str], reward, size: Size, cache: Path):
    """App. C.1's validation labels for one π0 response per held-out prompt (:func:`vas.experiments.validation.halfway_labels`),
    kept in the JSON file ``cache`` and reused from it."""
    import json

    from vas.decoding.loop import sample
    from vas.policy.local import LocalPolicy
    from vas.prompts import encode_prompts
    from vas.storage import write_json_atomic
    from vas.experiments.validation import HalfwayLabels, halfway_labels

    if cache.is_file():
        saved = json.loads(cache.read_text())
        return HalfwayLabels(saved["prompt_ids"], saved["prefix_ids"], torch.tensor(saved["labels"]),
                             torch.tensor(saved["label_variance"]))
    setup.log(f"halfway labels: {len(held_out)} held-out π0 responses, {size.completions} completions of each half")
    ids = encode_prompts(setup.tokenizer, held_out)
    seed = setup.seed + 12345  # not the seed of the decoding runs
    responses = sample(LocalPolicy(setup.policy, setup.tokenizer), ids, max_new_tokens=size.recipe.max_new_tokens,
                       generator=torch.Generator().manual_seed(seed))
    labels = halfway_labels(setup.policy, setup.tokenizer, held_out, ids, responses.token_ids, reward,
                            completions=size.completions, max_new_tokens=size.recipe.max_new_tokens, seed=seed)
    write_json_atomic(cache, {"prompt_ids": labels.prompt_ids, "prefix_ids": labels.prefix_ids,
                              "labels": labels.labels.tolist(), "label_variance": labels.label_variance.tolist()})
    return labels


def plot(summary: dict, size: Size, path: Path) -> None:
    plt = pyplot()
    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13.0, 4.6), dpi=110, gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    y = list(range(len(rows)))[::-1]
    ax.errorbar([r["delta"] for r in rows], y, xerr=[2 * r["delta_sem"] for r in rows], marker="o", linestyle="none",
                capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"{r['condition']} (KL {r['kl']:.1f})" for r in rows], fontsize=8)
    ax.set_xlabel("reward − reference's reward, paired over prompts (±2 s.e.)")
    ax.set_title(f"Ablations at β = {size.beta:g} ({summary['settings']['eval_prompts']} prompts × "
                 f"{summary['settings']['samples_per_prompt']} samples)")
    ax.grid(alpha=0.3, axis="x")
    ax = axes[1]
    data_rows = [r for r in rows if r["lam"] == size.recipe.lam and not r["masked"] and r["top_k"] == size.top_k]
    data_rows.sort(key=lambda r: r["prompts"])
    ax.errorbar([r["halfway_mse"] for r in data_rows], [r["reward"] for r in data_rows],
                yerr=[r["reward_sem"] for r in data_rows], marker="o", capsize=3, label="TD(λ), by training prompts")
    for r in data_rows:
        ax.annotate(f"{r['prompts']} prompts", (r["halfway_mse"], r["reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    others = [r for r in rows if r["lam"] != size.recipe.lam]
    ax.errorbar([r["halfway_mse"] for r in others], [r["reward"] for r in others], yerr=[r["reward_sem"] for r in others],
                marker="s", capsize=3, linestyle="none", label="TD(0) / Monte-Carlo")
    for r in others:
        ax.annotate(r["condition"].split(",")[0], (r["halfway_mse"], r["reward"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.axvline(summary["labels"]["variance"], color="grey", linestyle=":", linewidth=0.8)
    ax.axvline(summary["labels"]["noise"], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("MSE to halfway labels (dotted: label variance; dashed: label noise)")
    ax.set_ylabel(f"reward at β = {size.beta:g}")
    ax.set_title("Value accuracy vs reward (Table 3)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def sections(summary: dict, size: Size) -> list[Section]:
    """Three sections (targets, top-k, value accuracy), each with its verdict from the numbers alone."""
    return [targets_section(summary, size), top_k_section(summary, size), data_section(summary, size)]


TABLE_HEADER = ("| condition | reward | Δ vs reference (paired) | KL nats | tokens | MSE to halfway labels | "
                "share of label variance explained |\n|---|---|---|---|---|---|---|")
"""The head of the conditions' table (:func:`table_row`)."""


def table_row(r: dict) -> str:
    """One condition's row of the table under :data:`TABLE_HEADER` (``r``: a row of the summary)."""
    return (f"| {r['condition']} | {r['reward']:.3f} ± {r['reward_sem']:.3f} | {r['delta']:+.3f} ± {r['delta_sem']:.3f} | "
            f"{r['kl']:.2f} | {r['tokens']:.1f} | {r['halfway_mse']:.4f} | {r['explained']:+.2f} |")


def settings_text(summary: dict, size: Size) -> str:
    """The settings every ablation section shares: β, the held-out prompts, plain π0's reward, the halfway labels."""
    labels = summary["labels"]
    return (f"VAS at β = {size.beta:g} on {size.eval_prompts} held-out chitchat openings × {size.samples_per_prompt} "
            f"samples, same seeds in every condition; plain π0: {summary['plain']['reward']:.3f} ± "
            f"{summary['plain']['reward_sem']:.3f}. Halfway labels: {labels['states']} held-out states, "
            f"{size.completions} completions each (label variance {labels['variance']:.4f}, label noise "
            f"{labels['noise']:.4f}, i.e. the MSE a perfect V^π0 would still show).")


def targets_section(summary: dict, size: Size) -> Section:
    """App. D.1's value targets: TD(λ) against TD(0) and Monte-Carlo, on the same training prompts."""
    rows = {r["condition"]: r for r in summary["rows"]}
    n = size.target_prompts
    common = settings_text(summary, size)
    td_lam, td0, mc = rows[f"TD(λ), {n} prompts"], rows[f"TD(0), {n} prompts"], rows[f"Monte-Carlo, {n} prompts"]
    t = summary["targets"]
    (d0, s0), (k0, ks0) = t[f"td0_minus_td_lambda_{REWARD}"], t["td0_minus_td_lambda_kl"]
    (dm, sm), (km, ksm) = t[f"monte_carlo_minus_td_lambda_{REWARD}"], t["monte_carlo_minus_td_lambda_kl"]
    targets_verdict = worse(d0, s0, k0, ks0)
    return Section(
        "ablations-targets", "Ablation: TD(λ) against TD(0) and Monte-Carlo targets (App. D.1)",
        "Training the value model with TD(0) targets instead of TD(λ) costs a little reward (the paper: “probably "
        "as a result of higher value estimation error”).",
        targets_verdict,
        f"""`vas experiment {NAME}`. Three value models trained on the same {n} training prompts × {size.recipe.samples_per_prompt} responses,
differing only in λ. {common}

{TABLE_HEADER}
{table_row(td_lam)}
{table_row(td0)}
{table_row(mc)}

Paired over prompts, reward: TD(0) − TD(λ) = {d0:+.3f} ± {s0:.3f}, Monte-Carlo − TD(λ) = {dm:+.3f} ± {sm:.3f}; KL:
{k0:+.2f} ± {ks0:.2f} and {km:+.2f} ± {ksm:.2f} nats. MSE to the halfway labels: TD(λ) {td_lam['halfway_mse']:.4f}, TD(0)
{td0['halfway_mse']:.4f}, Monte-Carlo {mc['halfway_mse']:.4f}. All three are compared at one β: a value model whose V
varies more between candidate tokens moves further from π0 at the same β, so a condition is called worse only
if it has less reward without less KL, or no more reward for more KL (otherwise it trades one for the other and
a β grid per model would be needed: inconclusive). TD(0) targets bootstrap each state from the next state's
current estimate only, so the final reward reaches early states slowly; after {size.recipe.epochs:g} epochs its V is{" nearly" if td0["kl"] < 0.25 * td_lam["kl"] else ""} flat over the candidates (KL {td0['kl']:.2f} at β = {size.beta:g}).

![ablations]({NAME}/ablations.png)""")


def top_k_section(summary: dict, size: Size) -> Section:
    """App. D.1's masking outside the top-k and D.2's k, against the reference."""
    rows = {r["condition"]: r for r in summary["rows"]}
    ordered = summary["rows"]
    reference = ordered[0]
    common = settings_text(summary, size)
    masked = rows[f"masked outside the top-{size.top_k}"]
    masked_verdict = worse(masked["delta"], masked["delta_sem"], masked["kl_delta"], masked["kl_delta_sem"])
    k_rows = sorted([r for r in ordered if r["condition"].startswith("k=")] + [reference], key=lambda r: r["top_k"])
    largest = k_rows[-1]
    k_verdict = worse(largest["delta"], largest["delta_sem"], largest["kl_delta"], largest["kl_delta_sem"])
    return Section(
        "ablations-top-k", "Ablation: tokens outside the top-k, and k (App. D.1, D.2)",
        "Masking the tokens outside the top-k (instead of giving them β·mean(V), Eq. 5) makes VAS worse on the "
        "reward–KL plane; at a fixed β, a small k (10–20) does better than a large one.",
        verdict_of([masked_verdict, k_verdict]),
        f"""{common} The value model is the reference's (all {size.train_prompts} training prompts, TD(λ)).

{TABLE_HEADER}
{table_row(reference)}
{table_row(masked)}
{chr(10).join(table_row(r) for r in k_rows if r is not reference)}

Masking: reward {masked['delta']:+.3f} ± {masked['delta_sem']:.3f} and KL {masked['kl_delta']:+.2f} ± {masked['kl_delta_sem']:.2f} nats against Eq. 5
(paired; worse means less reward without less KL, or no more reward for more KL: {masked_verdict}). The paper's D.1 text describes removing the bonus of the tokens outside the top-k;
this experiment masks them (probability 0), the stronger variant (those tokens can never be sampled). k = {largest['top_k']}
against k = {size.top_k}: reward {largest['delta']:+.3f} ± {largest['delta_sem']:.3f}, KL {largest['kl_delta']:+.2f} ± {largest['kl_delta_sem']:.2f} (worse: {k_verdict}). A larger k also costs more: seconds per
response {", ".join(f"k={r['top_k']}: {r['seconds_per_response']:.2f}" for r in k_rows)}.""")


def data_section(summary: dict, size: Size) -> Section:
    """Table 3: value accuracy (MSE to the halfway labels) against reward over training-set sizes."""
    from vas.experiments.beta_knob import spearman

    ordered = summary["rows"]
    labels = summary["labels"]
    common = settings_text(summary, size)
    data_rows = sorted([r for r in ordered if r["lam"] == size.recipe.lam and not r["masked"] and r["top_k"] == size.top_k],
                       key=lambda r: r["prompts"])
    mse_falls = all(a["halfway_mse"] > b["halfway_mse"] for a, b in zip(data_rows, data_rows[1:]))
    reward_rises = all(a["reward"] < b["reward"] for a, b in zip(data_rows, data_rows[1:]))
    rho = spearman([r["halfway_mse"] for r in data_rows], [r["reward"] for r in data_rows])
    gap = data_rows[-1]["reward"] - data_rows[0]["reward"]
    gap_sem = (data_rows[-1]["reward_sem"] ** 2 + data_rows[0]["reward_sem"] ** 2) ** 0.5
    if mse_falls and reward_rises and gap > 2 * gap_sem:
        data_verdict = "reproduced"
    elif mse_falls and reward_rises:
        data_verdict = "inconclusive"
    elif mse_falls or reward_rises:
        data_verdict = "partly reproduced"
    else:
        data_verdict = "not reproduced"
    table = "\n".join(f"| {r['prompts']} × {size.recipe.samples_per_prompt} | {r['halfway_mse']:.4f} | {r['explained']:+.2f} | "
                      f"{r['reward']:.3f} ± {r['reward_sem']:.3f} | {r['kl']:.2f} |" for r in data_rows)
    return Section(
        "ablations-data", "Ablation: value accuracy against reward over training-set sizes (Table 3)",
        "More training data gives a value model with lower validation MSE (to App. C.1's halfway labels), and "
        "lower MSE goes with higher reward.",
        data_verdict,
        f"""{common}

| training responses | MSE to halfway labels | share of label variance explained | reward | KL nats |
|---|---|---|---|---|
{table}

MSE falls with more data: {"yes" if mse_falls else "no"}; reward rises: {"yes" if reward_rises else "no"} (largest − smallest
size: {gap:+.3f} ± {gap_sem:.3f}); Spearman ρ(MSE, reward) = {rho:.2f} over {len(data_rows)} sizes (the paper's Table 3: ρ = −1
over 3 sizes). A model can only be as good as the label noise allows ({labels['noise']:.4f}); the variance of the
labels ({labels['variance']:.4f}) is the MSE of the best constant.""")
