"""Reward–KL frontier with decoding cost (paper Fig. 2/3, App. D.4), and a judge that was not optimised
(Sec. 4's GPT-4 win rates, here a second sentiment scorer).

Task: positivity (VADER) of replies to chitchat openings. One value model is trained on π0's scored
responses to the training openings; on held-out openings VAS runs over a β grid (several samples per
prompt, each with its own seed) against Best-of-N over N = 1 … 32 (estimated without bias from a pool of
32 π0 samples per prompt) and plain sampling. Every point carries its decoding cost: wall seconds per prompt
on this machine and matmul GFLOP per prompt (machine-independent). Every response is then scored by
TextBlob polarity, which the value model never saw, and each method's win rate against plain π0 samples
is reported under both scorers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vas.experiments.report import Section, pyplot, save_figure
from vas.pipeline import Recipe

NAME = "frontier"
REWARD = "positivity"
JUDGE = "textblob"
PROMPTS = "chitchat"


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 25 minutes on 2 CPU cores, the shared stage included)."""

    train_prompts: int = 256
    eval_prompts: int = 32
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    top_k: int = 10
    betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    vas_samples_per_prompt: int = 3
    batch_size: int = 16
    reference_n: int = 16


QUICK = Size(train_prompts=8, eval_prompts=3, recipe=Recipe(samples_per_prompt=2, max_new_tokens=8, epochs=1.0,
                                                            batch_size=8, backbone_layers=1),
             betas=(1.0, 8.0), best_of=(1, 2, 4), vas_samples_per_prompt=2, batch_size=8, reference_n=4)


def matmul_flops_per_token(model: torch.nn.Module) -> float:
    """2 × the parameters a token passes through in matrix products: every parameter except the input
    embedding table, plus the output projection when it shares that table (tied embeddings). Attention over
    the context and element-wise work are left out (small at these lengths)."""
    embedding = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters() if p is not embedding)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is embedding:
        params += embedding.numel()
    return 2.0 * params


def judge_table(rows: list[dict], report: dict) -> dict:
    """Win rates against plain π0 samples under the optimised reward and under the judge, per method
    (Best-of-N for N below the pool size only, see :func:`vas.judge.best_of_n_win_rate`)."""
    from vas.evaluate import best_of_n_weights, standard_error
    from vas.judge import best_of_n_win_rate, pool_tensor, win_rate_against_pool

    pool_reward, pool_judge = pool_tensor(rows, "reward"), pool_tensor(rows, "judge")
    P = pool_reward.shape[0]
    result = {"plain": {}, "vas": [], "best_of_n": []}
    for key, pool in (("reward", pool_reward), ("judge", pool_judge)):
        result["plain"][f"{key}_mean"] = float(pool.mean())
    for entry in report["vas"]:
        steered = sorted((r for r in rows if r["method"] == "vas" and r["beta"] == entry["beta"]),
                         key=lambda r: (r["prompt_index"], r["sample"]))
        out = {"beta": entry["beta"]}
        for key, pool in (("reward", pool_reward), ("judge", pool_judge)):
            scores = torch.tensor([r[key] for r in steered]).view(P, -1)
            per_prompt = win_rate_against_pool(scores, pool)
            out[f"{key}_win_rate"], out[f"{key}_win_rate_sem"] = float(per_prompt.mean()), standard_error(per_prompt)
            out[f"{key}_mean"] = float(scores.mean())
        result["vas"].append(out)
    order = pool_reward.argsort(dim=1)
    for entry in report["best_of_n"]:
        if entry["n"] >= pool_reward.shape[1]:
            continue  # the win rate needs an opponent outside the N samples
        out = {"n": entry["n"]}
        weights = best_of_n_weights(pool_reward.shape[1], entry["n"]).float()
        for key, pool in (("reward", pool_reward), ("judge", pool_judge)):
            per_prompt = best_of_n_win_rate(pool_reward, pool, entry["n"])
            out[f"{key}_win_rate"], out[f"{key}_win_rate_sem"] = float(per_prompt.mean()), standard_error(per_prompt)
            out[f"{key}_mean"] = float((pool.gather(1, order) * weights).sum(dim=1).mean())
        result["best_of_n"].append(out)
    return result


def plot(report: dict, judged: dict, path: Path, reference_n: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.4), dpi=110)
    vas = sorted(report["vas"], key=lambda v: v["beta"])
    bon = report["best_of_n"]
    plain = report["plain"]
    panels = (("kl", "KL(π ‖ π0) per response [nats] (Best-of-N: bound)", False),
              ("seconds_per_prompt", "decoding seconds per prompt (2 CPU cores, log scale)", True))
    for ax, (key, label, log) in zip(axes[:2], panels):
        ax.errorbar([b[key] for b in bon], [b["reward"] for b in bon], yerr=[b["reward_sem"] for b in bon],
                    marker="s", capsize=3, label="Best-of-N")
        for b in bon:
            ax.annotate(f"N={b['n']}", (b[key], b["reward"]), textcoords="offset points", xytext=(4, -11), fontsize=8)
        ax.errorbar([v[key] for v in vas], [v["reward"] for v in vas], yerr=[v["reward_sem"] for v in vas],
                    marker="o", capsize=3, label=f"VAS (k={report['settings']['top_k']})")
        for v in vas:
            ax.annotate(f"β={v['beta']:g}", (v[key], v["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        x0 = 0.0 if key == "kl" else plain[key]
        ax.errorbar([x0], [plain["reward"]], yerr=[plain["reward_sem"]], marker="*", markersize=12, color="black",
                    capsize=3, linestyle="none", label="plain sampling (π0)")
        reference = next(b for b in bon if b["n"] == reference_n)
        ax.axhline(reference["reward"], color="grey", linestyle=":", linewidth=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean positivity (VADER), held-out prompts")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"Reward vs KL (dotted: Best-of-{reference_n})")
    axes[1].set_title("Reward vs decoding cost")
    ax = axes[2]
    for group, marker, name, label_key in ((judged["best_of_n"], "s", "Best-of-N", "n"), (judged["vas"], "o", "VAS", "beta")):
        entries = sorted(group, key=lambda e: e[label_key])
        ax.errorbar([e["reward_win_rate"] for e in entries], [e["judge_win_rate"] for e in entries],
                    xerr=[e["reward_win_rate_sem"] for e in entries], yerr=[e["judge_win_rate_sem"] for e in entries],
                    marker=marker, capsize=2, label=name)
    ax.plot([0.0, 1.0], [0.0, 1.0], color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xlim(0.3, 1.0)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("win rate vs plain π0, by VADER (optimised)")
    ax.set_ylabel("win rate vs plain π0, by TextBlob (not optimised)")
    ax.set_title("Judged by a scorer VAS never saw")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) the positivity value model, run :func:`vas.evaluate.evaluate` into ``out/eval`` (reused
    if present), judge every response, write ``summary.json``, ``judged_responses.jsonl`` and ``frontier.png``
    to ``out`` and return the report's frontier and judge sections."""
    import json

    from vas.evaluate import evaluate
    from vas.policy.local import LocalPolicy
    from vas.experiments.setup import Setup
    from vas.judge import read_responses
    from vas.prompts import load_prompts
    from vas.rewards import load_reward, score
    from vas.storage import write_json_atomic, write_text_atomic

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    recipe = size.recipe
    data, stage = setup.samples(PROMPTS, size.train_prompts, recipe, REWARD)
    value_dir = setup.value_model(stage, data, REWARD, recipe)
    eval_dir = out / "eval"
    held_out = load_prompts(PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    value_model = setup.load_value_model(value_dir)
    if (eval_dir / "report.json").is_file() and (eval_dir / "responses.jsonl").is_file():
        log(f"evaluation: reusing {eval_dir}")
        report = json.loads((eval_dir / "report.json").read_text())
        report["settings"]["prompts"] = len(held_out)  # the count (reports before 2026-11-30 stored the source here)
    else:
        report = evaluate(LocalPolicy(setup.policy, setup.tokenizer), held_out, load_reward(REWARD), [value_model], eval_dir,
                          betas=size.betas, top_k=size.top_k, best_of=size.best_of,
                          vas_samples_per_prompt=size.vas_samples_per_prompt, max_new_tokens=recipe.max_new_tokens,
                          batch_size=size.batch_size, seed=seed, progress=progress,
                          metadata={"reward": REWARD, "base_model": base_model, "prompt_source": PROMPTS})
    rows = read_responses(eval_dir)
    for row, j in zip(rows, score(load_reward(JUDGE), [r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()):
        row["judge"] = j
    judged = judge_table(rows, report)

    policy_flops, value_flops = matmul_flops_per_token(setup.policy), matmul_flops_per_token(value_model.backbone)
    for entry in report["vas"] + report["best_of_n"] + [report["plain"]]:
        entry["gflop"] = (entry["policy_tokens"] * policy_flops + entry["value_tokens"] * value_flops) / 1e9
    write_json_atomic(out / "summary.json", {"report": report, "judge": JUDGE, "judged": judged,
                                             "flops_per_token": {"policy": policy_flops, "value": value_flops}})
    write_text_atomic(out / "judged_responses.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    plot(report, judged, out / "frontier.png", size.reference_n)
    rewards = torch.tensor(data["reward"])
    accuracy = {"reward_variance": float(rewards.var(unbiased=False)), **value_model.value_config.get("metrics", {})}
    return [frontier_section(report, judged, size, value_layers=value_model.value_config["num_layers"],
                             policy_layers=setup.policy.config.num_hidden_layers, train_rows=len(data),
                             accuracy=accuracy),
            judge_section(report, judged)]


def frontier_section(report: dict, judged: dict, size: Size, *, value_layers: int, policy_layers: int,
                     train_rows: int, accuracy: dict) -> Section:
    """The frontier's report section: the table, verdict and reasons, from the measured numbers alone."""
    recipe = size.recipe
    reference = next(b for b in report["best_of_n"] if b["n"] == size.reference_n)
    vas = sorted(report["vas"], key=lambda v: v["beta"])
    judged_vas = {j["beta"]: j for j in judged["vas"]}
    judged_bon = {j["n"]: j for j in judged["best_of_n"]}
    # "reaches" Best-of-N's reward: not below it by more than two standard errors of the difference
    reaching = [v for v in vas if v["reward"] >= reference["reward"] - 2 * math.hypot(v["reward_sem"], reference["reward_sem"])]
    cheaper = [v for v in reaching if v["kl"] < reference["kl"] and v["seconds_per_prompt"] < reference["seconds_per_prompt"]]
    plain = report["plain"]
    if not any(v["reward"] > plain["reward"] + 2 * math.hypot(v["reward_sem"], plain["reward_sem"]) for v in vas):
        verdict = "inconclusive"  # VAS never beats plain sampling beyond noise: nothing to compare
    elif cheaper:
        verdict = "reproduced"
    elif reaching:
        verdict = "partly reproduced"
    else:
        verdict = "not reproduced"

    def row(name, e, j):
        if j is None:  # no opponent left outside the N samples: no win rate
            j = {"reward_win_rate": None}
        spread = ""
        if "reward_by_sample" in e and len(e["reward_by_sample"]) > 1:
            spread = f" ({min(e['reward_by_sample']):.3f}–{max(e['reward_by_sample']):.3f})"
        kl = f"≤ {e['kl']:.2f}" if e.get("kl_is_bound") else f"{e['kl']:.2f}"
        wins = ("— | — | —" if j["reward_win_rate"] is None else
                f"{j['reward_win_rate']:.2f} | {j['judge_win_rate']:.2f} ± {j['judge_win_rate_sem']:.2f} | {j['judge_mean']:.3f}")
        return (f"| {name} | {e['reward']:.3f} ± {e['reward_sem']:.3f}{spread} | {kl} | {e['length']:.1f} | "
                f"{e['seconds_per_prompt']:.2f} | {e['gflop']:.1f} | {wins} |")

    plain_j = {"reward_win_rate": 0.5, "judge_win_rate": 0.5, "judge_win_rate_sem": 0.0,
               "judge_mean": judged["plain"]["judge_mean"]}
    lines = [row("plain π0", report["plain"], plain_j)]
    lines += [row(f"Best-of-{b['n']}", b, judged_bon.get(b["n"])) for b in report["best_of_n"]]
    lines += [row(f"VAS β={v['beta']:g}", v, judged_vas[v["beta"]]) for v in vas]
    best_vas = max(vas, key=lambda v: v["reward"])
    why = ""
    if not cheaper and "eval_final_mse" in accuracy:
        why = (f"Likeliest reason: the value model's estimates are noisy. Even for finished responses, whose value "
               f"is exactly their reward, its validation MSE is {accuracy['eval_final_mse']:.3f} against a reward "
               f"variance of {accuracy['reward_variance']:.3f} (over all states, against the final reward: "
               f"{accuracy.get('eval_mc_mse', float('nan')):.3f}); see the ablations below for its error against "
               "App. C.1's halfway labels and how the reward grows with the training data. VAS pays KL at every "
               "token where V misranks the top-k, while Best-of-N ranks whole responses by the true reward and its "
               f"KL is bounded by log N whatever it picks. The value model is also small ({value_layers} of π0's "
               f"{policy_layers} layers, trained on {train_rows} responses) next to the paper's 7B value models "
               "trained on tens of "
               "thousands of samples.")
    at_bound = [v for v in vas if v["kl"] <= reference["kl"]]
    kl_note = ""
    if at_bound:
        v = max(at_bound, key=lambda v: v["reward"])
        kl_note = (f"At a KL within Best-of-{size.reference_n}'s bound ({reference['kl']:.2f} nats) VAS reaches at most "
                   f"{v['reward']:.3f} (β={v['beta']:g}, KL {v['kl']:.2f}).")
    reasons = []
    if not reaching:
        reasons.append(
            f"No β reaches Best-of-{size.reference_n}'s reward ({reference['reward']:.3f}, within two standard errors); "
            f"the best VAS point is "
            f"β={best_vas['beta']:g} with {best_vas['reward']:.3f} at KL {best_vas['kl']:.2f}. At the same KL, "
            "Best-of-N's points lie above VAS's (plot, left)")
    elif not cheaper:
        v = reaching[0]
        kl_lower = v["kl"] < reference["kl"]
        time_lower = v["seconds_per_prompt"] < reference["seconds_per_prompt"]
        reasons.append(f"VAS reaches Best-of-{size.reference_n}'s reward (within two standard errors) first at "
                       f"β={v['beta']:g}: {v['reward']:.3f} against {reference['reward']:.3f}, at KL {v['kl']:.2f} "
                       f"({'below' if kl_lower else 'above'} Best-of-{size.reference_n}'s bound {reference['kl']:.2f}) "
                       f"in {v['seconds_per_prompt']:.2f} s per prompt ({'less' if time_lower else 'more'} than "
                       f"Best-of-{size.reference_n}'s {reference['seconds_per_prompt']:.2f} s) and "
                       f"{v['gflop']:.0f} GFLOP ({reference['gflop']:.0f})")
    else:
        v = cheaper[0]
        reasons.append(f"VAS at β={v['beta']:g} reaches {v['reward']:.3f} (Best-of-{size.reference_n}: "
                       f"{reference['reward']:.3f}) at KL {v['kl']:.2f}, below Best-of-{size.reference_n}'s bound "
                       f"{reference['kl']:.2f} (its true KL may be lower than the bound), in "
                       f"{v['seconds_per_prompt']:.2f} s per prompt ({reference['seconds_per_prompt']:.2f} s)")
    body = f"""`vas experiment {NAME}`: positivity (VADER compound, in [−1, 1]) of replies to chitchat openings. The value
model ({value_layers} of π0's {policy_layers} layers, LoRA r = {recipe.lora_rank}, TD(λ) λ = {recipe.lam:g}, {recipe.epochs:g} epochs,
lr {recipe.learning_rate:g}) is trained on π0's responses to {size.train_prompts} openings × {recipe.samples_per_prompt} ({train_rows} responses, ≤ {recipe.max_new_tokens} tokens,
τ = 0.7; the responses to 10 % of the openings are held out for its validation). Evaluation on {report['settings']['prompts']} held-out openings: Best-of-N from a pool of {report['settings']['n_pool']}
π0 samples per prompt (unbiased estimator; KL is the analytic bound log N − (N−1)/N); VAS with k = {size.top_k},
{size.vas_samples_per_prompt} independent samples per prompt (in brackets: the range of the mean over prompts of the 1st, 2nd, …
sample), exact KL. Cost: wall seconds per prompt at batch {size.batch_size} on this machine (Best-of-N: N × the pool's
per-sample time, reward included; the value model in bf16 where the CPU has it) and matmul GFLOP per prompt
(prompt and response tokens through π0, N times for Best-of-N; for VAS also the prompt and k + 1 tokens per
step through the value model). Win rates are
against π0 samples of the same prompt (ties count ½); TextBlob polarity is the judge VAS was not trained on.

| method | reward (VADER) | KL nats | tokens | s / prompt | GFLOP / prompt | win rate, VADER | win rate, TextBlob | mean TextBlob |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

![frontier]({NAME}/frontier.png)

{". ".join(reasons)}.{(" " + kl_note) if kl_note else ""}{(" " + why) if why else ""}

Data: `{NAME}/summary.json`, every response with both scores in `{NAME}/judged_responses.jsonl`, the raw
evaluation in `{NAME}/eval/`. An LLM judge (App. E.2's pairwise protocol) can be run on the same responses:
`vas judge {NAME}/eval --base-url URL --model NAME --betas B --best-of {size.reference_n}`."""
    return Section(NAME, "Reward–KL frontier and decoding cost against Best-of-N (Fig. 2/3, App. D.4)",
                   f"VAS reaches Best-of-{size.reference_n}'s reward at lower KL and lower decoding time.", verdict, body)


def judge_section(report: dict, judged: dict) -> Section:
    """The unoptimised judge's section: do the gains under VADER survive under TextBlob?"""
    winners = [j for j in judged["vas"] + judged["best_of_n"] if j["reward_win_rate"] > 0.6]
    held = [j for j in winners if j["judge_win_rate"] > 0.5 + 2 * j["judge_win_rate_sem"]]
    if not winners:
        verdict = "inconclusive"  # nothing won under the optimised reward, so there is nothing to check
    else:
        verdict = "reproduced" if len(held) == len(winners) else "partly reproduced" if held else "not reproduced"

    def name(j):
        return f"VAS β={j['beta']:g}" if "beta" in j else f"Best-of-{j['n']}"

    lines = [f"| {name(j)} | {j['reward_win_rate']:.2f} ± {j['reward_win_rate_sem']:.2f} | "
             f"{j['judge_win_rate']:.2f} ± {j['judge_win_rate_sem']:.2f} | {j['reward_mean']:.3f} | {j['judge_mean']:.3f} |"
             for j in sorted(judged["best_of_n"], key=lambda j: j["n"]) + sorted(judged["vas"], key=lambda j: j["beta"])]
    lost = [name(j) for j in winners if j not in held]
    note = ("Every method that wins under VADER (win rate > 0.6) also wins under TextBlob by more than two standard "
            "errors" if not lost else
            "Winning under VADER but not significantly under TextBlob: " + ", ".join(lost) + ". The two lexicons "
            "disagree on many short replies (TextBlob scores most of them exactly 0, a tie), so a smaller margin "
            "is expected even without reward hacking; a gap much larger for VAS than for Best-of-N at the same "
            "VADER win rate would point to hacking by the value model")
    gaps = {group: [j["reward_win_rate"] - j["judge_win_rate"] for j in judged[key] if j["reward_win_rate"] > 0.6]
            for group, key in (("VAS", "vas"), ("Best-of-N", "best_of_n"))}
    gap_note = ""
    if gaps["VAS"] and gaps["Best-of-N"]:
        gap_note = (" Among the points that win under VADER, the win rate drops from VADER to TextBlob by "
                    f"{sum(gaps['VAS']) / len(gaps['VAS']):.2f} on average for VAS and by "
                    f"{sum(gaps['Best-of-N']) / len(gaps['Best-of-N']):.2f} for Best-of-N.")
    body = f"""Same responses as the frontier above, also scored by TextBlob polarity (a pattern-lexicon sentiment
scorer, in [−1, 1], that neither the value model nor Best-of-N's selection saw). Win rate against plain π0
samples of the same prompt, ties ½, ± s.e. over {report['settings']['prompts']} prompts; Best-of-N by an unbiased
estimator over the pool (its best of N against pool samples outside those N, so N = {report['settings']['n_pool']} has no row; its
VADER win rate is N/(N+1) by construction when rewards do not tie). Plain π0's
mean TextBlob score is {judged['plain']['judge_mean']:.3f}.

| method | win rate, VADER (optimised) | win rate, TextBlob (judge) | mean VADER | mean TextBlob |
|---|---|---|---|---|
{chr(10).join(lines)}

{note}.{gap_note} The right panel of the frontier plot shows the same numbers: points on the dotted diagonal
win as often under the judge as under the reward they were selected for."""
    return Section("judge", "A judge that was not optimised (Sec. 4's win rates, App. E)",
                   "VAS's (and Best-of-N's) gains in the optimised reward also show as wins under a judge the "
                   "method was not optimised for, i.e. they are not reward hacking.", verdict, body)

