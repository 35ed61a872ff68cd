"""VAS against fine-tuned policies and Best-of-N on one reward–KL–cost plane (paper Fig. 2/3, Table 1, App. D.4),
and a judge that was not optimised (Sec. 4's GPT-4 win rates, here a second sentiment scorer).

Task: positivity (VADER) of replies to chitchat openings. One collection of π0's scored responses to the
training openings is the data budget of every method: the value model is trained on it, DPO on its pairs
(per opening, the best response against the worst, at several β), and online RL (RLOO, KL penalty against π0)
draws as many responses as it holds, evaluated at two checkpoints. On held-out openings VAS runs over a β grid
(several samples per prompt, each with its own seed) against Best-of-N over N = 1 … 16 (estimated without bias
from a pool of 16 π0 samples per prompt), plain sampling, and the fine-tuned policies (exact KL on their own
samples). Every point carries its decoding cost (wall seconds per prompt on this machine and matmul GFLOP per
prompt, machine-independent) and the fine-tuned ones their training cost. Every response is then scored by
TextBlob polarity, which no method saw, and each method's win rate against plain π0 samples is reported under
both scorers.

Claims, as the paper makes them: (a) VAS's reward–KL trade-off beats the fine-tuned policies' (:func:`tradeoff_section`);
(b) VAS reaches Best-of-N's reward at a lower decoding cost (:func:`cost_section`, with (c), VAS against Best-of-N
at equal KL, as an observation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vas.config import FinetuneConfig
from vas.experiments.report import Section, beats, pyplot, reaches, save_figure
from vas.pipeline import Recipe

NAME = "frontier"
REWARD = "positivity"
JUDGE = "textblob"
PROMPTS = "chitchat"


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: ≈ 60 minutes on 2 CPU cores, the shared stage included; the fine-tuning
    takes about half of it)."""

    train_prompts: int = 128
    eval_prompts: int = 32
    recipe: Recipe = Recipe(samples_per_prompt=4, backbone_layers=8)
    top_k: int = 10
    betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    vas_samples_per_prompt: int = 2
    batch_size: int = 16
    # the fine-tuning's LoRA rank and learning rate are the value model's (Recipe: r = 16, lr 1e-3)
    dpo: FinetuneConfig = FinetuneConfig(method="dpo", epochs=1.0, batch_size=8, learning_rate=1e-3)
    dpo_kl_coefs: tuple[float, ...] = (0.03, 0.1, 0.3)
    online: FinetuneConfig = FinetuneConfig(method="rloo", kl_coef=0.05, epochs=1.0, batch_size=16, learning_rate=1e-3,
                                            snapshots=2)


QUICK = Size(train_prompts=8, eval_prompts=3, recipe=Recipe(samples_per_prompt=2, max_new_tokens=8, epochs=1.0,
                                                            batch_size=8, backbone_layers=1),
             betas=(1.0, 8.0), best_of=(1, 2, 4), vas_samples_per_prompt=2, batch_size=8,
             dpo=FinetuneConfig(method="dpo", epochs=1.0, batch_size=4), dpo_kl_coefs=(0.1,),
             online=FinetuneConfig(method="rloo", kl_coef=0.05, epochs=1.0, batch_size=4, snapshots=2))


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
    """Win rates against plain π0 samples under the optimised reward and under the judge, per method: VAS per
    β, each fine-tuned policy, and Best-of-N for N below the pool size only (see
    :func:`vas.judge.best_of_n_win_rate`)."""
    from vas.evaluate import best_of_n_weights, standard_error
    from vas.judge import best_of_n_win_rate, pool_tensor, win_rate_against_pool

    pool_reward, pool_judge = pool_tensor(rows, "reward"), pool_tensor(rows, "judge")
    P = pool_reward.shape[0]
    result = {"plain": {}, "vas": [], "best_of_n": [], "finetuned": []}
    for key, pool in (("reward", pool_reward), ("judge", pool_judge)):
        result["plain"][f"{key}_mean"] = float(pool.mean())

    def win_rates(chosen: list[dict], out: dict) -> dict:
        chosen = sorted(chosen, key=lambda r: (r["prompt_index"], r["sample"]))
        for key, pool in (("reward", pool_reward), ("judge", pool_judge)):
            scores = torch.tensor([r[key] for r in chosen]).view(P, -1)
            per_prompt = win_rate_against_pool(scores, pool)
            out[f"{key}_win_rate"], out[f"{key}_win_rate_sem"] = float(per_prompt.mean()), standard_error(per_prompt)
            out[f"{key}_mean"] = float(scores.mean())
        return out

    for entry in report["vas"]:
        result["vas"].append(win_rates([r for r in rows if r["method"] == "vas" and r["beta"] == entry["beta"]],
                                       {"beta": entry["beta"]}))
    for entry in report.get("finetuned", []):
        result["finetuned"].append(win_rates([r for r in rows if r["method"] == "finetuned" and r["policy"] == entry["name"]],
                                             {"name": entry["name"]}))
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


def plot(report: dict, judged: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.8), dpi=110)
    vas = sorted(report["vas"], key=lambda v: v["beta"])
    bon = report["best_of_n"]
    plain = report["plain"]
    tuned = report.get("finetuned", [])
    panels = (("kl", "KL(π ‖ π0) per response [nats, log scale above 1] (Best-of-N: bound)", False),
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
        for method, marker in (("dpo", "D"), ("rloo", "^"), ("grpo", "v")):
            group = sorted((f for f in tuned if f["method"] == method), key=lambda f: f["kl"])
            if group:
                ax.errorbar([f[key] for f in group], [f["reward"] for f in group], yerr=[f["reward_sem"] for f in group],
                            marker=marker, capsize=3, linestyle="--", label=f"{method.upper()} (LoRA, TRL)")
                for f in group:
                    ax.annotate(f["name"].split(" ", 1)[1], (f[key], f["reward"]), textcoords="offset points",
                                xytext=(4, 5 if "step" in f["name"] else -11), fontsize=7)
        if key == "kl" and report.get("optimum"):
            points = report["optimum"]["points"]
            ax.plot([p["kl"] for p in points], [p["reward"] for p in points], color="grey", linestyle="--",
                    label="KL-optimal π0·exp(r/α)/Z (estimate on the pool)")
        x0 = 0.0 if key == "kl" else plain[key]
        ax.errorbar([x0], [plain["reward"]], yerr=[plain["reward_sem"]], marker="*", markersize=12, color="black",
                    capsize=3, linestyle="none", label="plain sampling (π0)")
        if log:
            ax.set_xscale("log")
        else:  # linear below 1 nat, where Best-of-N lies; logarithmic above, where large β and DPO go
            ax.set_xscale("symlog", linthresh=1.0, linscale=1.0)
        ax.set_xlabel(label)
        ax.set_ylabel("mean positivity (VADER), held-out prompts")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Reward vs KL")
    axes[1].set_title("Reward vs decoding cost")
    ax = axes[2]
    for group, marker, name, label_key in ((judged["best_of_n"], "s", "Best-of-N", "n"), (judged["vas"], "o", "VAS", "beta"),
                                           (judged.get("finetuned", []), "D", "fine-tuned (DPO, RLOO)", "name")):
        entries = sorted(group, key=lambda e: e[label_key])
        if entries:
            ax.errorbar([e["reward_win_rate"] for e in entries], [e["judge_win_rate"] for e in entries],
                        xerr=[e["reward_win_rate_sem"] for e in entries], yerr=[e["judge_win_rate_sem"] for e in entries],
                        marker=marker, capsize=2, linestyle="none" if label_key == "name" else "-", label=name)
    ax.plot([0.0, 1.0], [0.0, 1.0], color="grey", linewidth=0.8, linestyle=":")
    ax.axhline(0.5, color="black", linewidth=0.6)
    ax.set_xlim(0.3, 1.0)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("win rate vs plain π0, by VADER (optimised)")
    ax.set_ylabel("win rate vs plain π0, by TextBlob (not optimised)")
    ax.set_title("Judged by a scorer no method saw")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Train (or reuse) the positivity value model and the fine-tuned policies on one collection of π0 samples,
    run :func:`vas.evaluate.evaluate` into ``out/eval`` (reused if present), judge every response, write
    ``summary.json``, ``judged_responses.jsonl`` and ``frontier.png`` to ``out`` and return the report's sections:
    the trade-off against fine-tuning (claim a), the cost against Best-of-N (claim b, observation c) and the judge."""
    import json

    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate
    from vas.experiments.setup import Setup
    from vas.finetune import load_finetuned, preference_pairs
    from vas.judge import read_responses
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward, score
    from vas.storage import write_json_atomic, write_text_atomic

    setup = Setup.load(out, base_model=base_model, device=device, seed=seed, progress=progress, log=log, size=size)
    recipe = size.recipe
    data, stage = setup.samples(PROMPTS, size.train_prompts, recipe, REWARD)
    value_dir = setup.value_model(stage, data, REWARD, recipe)
    adapters = []
    if len(preference_pairs(data, setup.tokenizer)):
        adapters += [setup.finetuned(stage, data, replace(size.dpo, kl_coef=c, seed=seed), REWARD) for c in size.dpo_kl_coefs]
    else:
        log("DPO skipped: every prompt's responses have the same reward, so there is no preference pair")
    adapters.append(setup.finetuned(stage, data, replace(size.online, seed=seed), REWARD))
    policies = []  # their weights load one at a time, when evaluated
    for adapter in adapters:
        snapshots = sorted((adapter / "snapshots").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        policies += [load_finetuned(p, base_model=base_model, device=device, dtype=setup.policy.dtype)
                     for p in [*snapshots, adapter]]
    eval_dir = out / "eval"
    held_out = load_prompts(PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    value_model = setup.load_value_model(value_dir)
    if (eval_dir / "report.json").is_file() and (eval_dir / "responses.jsonl").is_file():
        log(f"evaluation: reusing {eval_dir}")
        report = json.loads((eval_dir / "report.json").read_text())
    else:
        report = evaluate(LocalPolicy(setup.policy, setup.tokenizer), held_out, load_reward(REWARD), [value_model], eval_dir,
                          EvaluateConfig(betas=size.betas, top_k=size.top_k, best_of=size.best_of,
                                         vas_samples_per_prompt=size.vas_samples_per_prompt,
                                         max_new_tokens=recipe.max_new_tokens, batch_size=size.batch_size, seed=seed),
                          progress=progress, finetuned=policies,
                          metadata={"reward": REWARD, "base_model": base_model, "prompt_source": PROMPTS})
    rows = read_responses(eval_dir)
    for row, j in zip(rows, score(load_reward(JUDGE), [r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()):
        row["judge"] = j
    judged = judge_table(rows, report)

    policy_flops, value_flops = matmul_flops_per_token(setup.policy), matmul_flops_per_token(value_model.backbone)
    for entry in report["vas"] + report["best_of_n"] + report["finetuned"] + [report["plain"]]:
        entry["gflop"] = (entry["policy_tokens"] * policy_flops + entry["value_tokens"] * value_flops) / 1e9
    value_config = value_model.value_config
    settings = {"value_layers": value_config["num_layers"], "policy_layers": setup.policy.config.num_hidden_layers,
                "train_rows": len(data), "value_seconds": value_config.get("metrics", {}).get("train_seconds")}
    write_json_atomic(out / "summary.json", {"report": report, "judge": JUDGE, "judged": judged, "settings": settings,
                                             "flops_per_token": {"policy": policy_flops, "value": value_flops}})
    write_text_atomic(out / "judged_responses.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    plot(report, judged, out / "frontier.png")
    return [tradeoff_section(report, judged, size, **settings), cost_section(report, size),
            judge_section(report, judged)]


def interpolated(points: list[dict], kl: float) -> tuple[float, float] | None:
    """The reward (and its standard error) of a frontier at ``kl``, by linear interpolation between its points
    sorted by KL (each with ``kl``, ``reward``, ``reward_sem``); None outside their KL range."""
    points = sorted(points, key=lambda p: p["kl"])
    for a, b in zip(points, points[1:]):
        if a["kl"] <= kl <= b["kl"]:
            w = 0.0 if b["kl"] == a["kl"] else (kl - a["kl"]) / (b["kl"] - a["kl"])
            return ((1 - w) * a["reward"] + w * b["reward"], (1 - w) * a["reward_sem"] + w * b["reward_sem"])
    return None


def against_vas(entry: dict, report: dict) -> tuple[str, str]:
    """Where a point (a fine-tuned policy, or Best-of-N at its KL bound) stands against VAS's reward–KL frontier
    (plain π0 at KL 0, then VAS's β points, joined by straight lines): ``below`` (VAS's reward at the same KL is
    higher by more than two standard errors), ``above`` (lower by more than two), ``tie`` (within two), or
    ``outside`` (at a KL beyond VAS's largest: VAS was not measured there); with a sentence giving the numbers."""
    frontier = [{**report["plain"], "kl": 0.0}] + report["vas"]
    at = interpolated(frontier, entry["kl"])
    if at is None:
        best = max(report["vas"], key=lambda v: v["kl"])
        return "outside", (f"at KL {entry['kl']:.2f}, beyond VAS's largest ({best['kl']:.2f}, β={best['beta']:g}, "
                           f"{best['reward']:.3f})")
    reward, sem = at
    noise = 2 * math.hypot(sem, entry["reward_sem"])
    where = "below" if entry["reward"] < reward - noise else "above" if entry["reward"] > reward + noise else "tie"
    return where, f"{entry['reward']:.3f} against VAS's {reward:.3f} at the same KL ({entry['kl']:.2f}; 2 s.e. = {noise:.3f})"


def tradeoff_section(report: dict, judged: dict, size: Size, *, value_layers: int, policy_layers: int,
                     train_rows: int, value_seconds: float | None) -> Section:
    """Claim (a), Fig. 2/3: the table of every method and the verdict on VAS against the fine-tuned policies."""
    recipe = size.recipe
    tuned = report.get("finetuned", [])
    places = {f["name"]: against_vas(f, report) for f in tuned}
    verdict = tradeoff_verdict(report, places)
    lines = method_rows(report, judged, train_rows=train_rows, value_seconds=value_seconds)
    findings = [f"{name}: {text} ({where})" for name, (where, text) in places.items()]
    why = "" if verdict == "reproduced" else tradeoff_shortfall(report, places, size, train_rows)
    dpo_note = "" if any(f["method"] == "dpo" for f in tuned) else " (skipped: every opening's responses tie)"
    optimum_note = ("KL overhead: the method's KL divided by the KL the KL-optimal policy π0·exp(r/α)/Z needs for the "
                    "same reward, estimated on the pool of π0 samples (its KL is capped at log "
                    f"{report['settings']['n_pool']}, so at high reward it is a lower bound on the optimum's reward); "
                    "— where undefined (at or below plain sampling's reward, or beyond the estimate's reach)."
                    if report.get("optimum") else "")
    body = f"""`vas experiment {NAME}`: positivity (VADER compound, in [−1, 1]) of replies to chitchat openings. The data
budget of every method is one collection of π0's responses to {size.train_prompts} openings × {recipe.samples_per_prompt} ({train_rows} responses,
≤ {recipe.max_new_tokens} tokens, τ = 0.7). **VAS**: a value model ({value_layers} of π0's {policy_layers} layers, LoRA r = {recipe.lora_rank}, TD(λ) λ = {recipe.lam:g},
{recipe.epochs:g} epochs) trained on it. **DPO** (TRL, LoRA r = {size.dpo.lora_rank} on every linear layer, {size.dpo.epochs:g} epoch, lr {size.dpo.learning_rate:g},
batch {size.dpo.batch_size}) on its pairs: per opening, the highest-reward response against the lowest, at KL coefficients
(DPO's own β) {", ".join(f"{c:g}" for c in size.dpo_kl_coefs)}{dpo_note}.
**RLOO** (TRL, online, the same LoRA, lr {size.online.learning_rate:g}, {size.online.samples_per_prompt or recipe.samples_per_prompt} responses per opening and step, batch {size.online.batch_size}, KL penalty
{size.online.kl_coef:g}·Σ log π_θ/π0 in the reward) drawing as many responses as the collection holds, evaluated halfway
and at the end. Evaluation on {report['settings']['prompts']} held-out openings, {size.vas_samples_per_prompt} samples each for VAS (k = {size.top_k}) and every
fine-tuned policy with the exact sequence KL Σ_t KL(π(·|s_t) ‖ π0(·|s_t)) on their own samples (τ = 0.7 for all);
Best-of-N from a pool of {report['settings']['n_pool']} π0 samples per prompt (unbiased estimator; KL is the bound log N − (N−1)/N).
Cost: decoding seconds per prompt at batch {size.batch_size} on this machine (Best-of-N: N × the pool's per-sample time, reward
included; a fine-tuned policy, its adapter merged, decodes at plain π0's time per token), matmul GFLOP per
prompt, and the training (wall time; π0 samples read or responses drawn). Win rates against π0 samples of
the same prompt (ties ½); TextBlob polarity is a judge no method was trained on.

| method | reward (VADER) | KL nats | KL overhead | tokens | s / prompt | GFLOP / prompt | training | win rate, VADER | win rate, TextBlob |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

{optimum_note}

![frontier]({NAME}/frontier.png)

Against VAS's frontier (plain π0 at KL 0, then its β points joined by straight lines), each fine-tuned policy:
{chr(10).join("- " + f for f in findings) if findings else "- none was trained."}

{why}

Data: `{NAME}/summary.json`, every response with both scores in `{NAME}/judged_responses.jsonl`, the raw
evaluation in `{NAME}/eval/`. An LLM judge (App. E.2's pairwise protocol) can be run on the same responses:
`vas judge {NAME}/eval --base-url URL --model NAME --betas B --best-of N`."""
    return Section(NAME, "VAS against fine-tuned policies: the reward–KL trade-off (Fig. 2/3, Table 1)",
                   "VAS's reward–KL trade-off beats that of policies fine-tuned on the same data (PPO and DPO in the "
                   "paper; here DPO and RLOO through TRL): at the KL a fine-tuned policy pays, VAS reaches a higher "
                   "reward.", verdict, body)


def tradeoff_verdict(report: dict, places: dict[str, tuple[str, str]]) -> str:
    """Claim (a)'s verdict from where each fine-tuned policy stands against VAS's frontier (``places``:
    :func:`against_vas` by name); inconclusive where VAS never beats plain sampling beyond noise."""
    if not any(beats(v, report["plain"]) for v in report["vas"]):
        return "inconclusive"  # VAS never beats plain sampling beyond noise: nothing to compare
    below = [n for n, (w, _) in places.items() if w == "below"]
    if any(w == "above" for w, _ in places.values()):
        return "not reproduced"
    if below and len(below) == len(report.get("finetuned", [])):
        return "reproduced"
    return "partly reproduced" if below else "inconclusive"


def method_rows(report: dict, judged: dict, *, train_rows: int, value_seconds: float | None) -> list[str]:
    """The trade-off table's rows: plain π0, Best-of-N, VAS per β and each fine-tuned policy, with reward, KL, KL
    overhead, length, decoding cost, training cost and win rates (:func:`judge_table`'s)."""
    from vas.evaluate import kl_overhead

    judged_by = {("vas", j["beta"]): j for j in judged["vas"]}
    judged_by.update({("bon", j["n"]): j for j in judged["best_of_n"]})
    judged_by.update({("ft", j["name"]): j for j in judged.get("finetuned", [])})

    def row(name, e, j, training="—"):
        kl = f"≤ {e['kl']:.2f}" if e.get("kl_is_bound") else f"{e['kl']:.2f}"
        wins = ("— | —" if j is None else f"{j['reward_win_rate']:.2f} | {j['judge_win_rate']:.2f} ± {j['judge_win_rate_sem']:.2f}")
        overhead = kl_overhead(e["kl"], e["reward"], report["optimum"]) if report.get("optimum") else None
        overhead = "—" if overhead is None else ("≤ " if e.get("kl_is_bound") else "") + f"{overhead:.1f}×"
        return (f"| {name} | {e['reward']:.3f} ± {e['reward_sem']:.3f} | {kl} | {overhead} | {e['length']:.1f} | "
                f"{e['seconds_per_prompt']:.2f} | {e['gflop']:.1f} | {training} | {wins} |")

    def cost(t):
        samples = f"{t['samples_drawn']} drawn" if t.get("samples_drawn") else f"{t['samples_read']} read"
        return f"{t['seconds'] / 60:.1f} min, {samples}" if t.get("seconds") is not None else samples

    lines = [row("plain π0", report["plain"], {"reward_win_rate": 0.5, "judge_win_rate": 0.5, "judge_win_rate_sem": 0.0})]
    lines += [row(f"Best-of-{b['n']}", b, judged_by.get(("bon", b["n"]))) for b in report["best_of_n"]]
    lines += [row(f"VAS β={v['beta']:g}", v, judged_by.get(("vas", v["beta"])),
                  "value model: " + cost({"seconds": value_seconds, "samples_read": train_rows}))
              for v in sorted(report["vas"], key=lambda v: v["beta"])]
    lines += [row(f["name"], f, judged_by.get(("ft", f["name"])), cost(f["training"])) for f in report.get("finetuned", [])]
    return lines


def tradeoff_shortfall(report: dict, places: dict[str, tuple[str, str]], size: Size, train_rows: int) -> str:
    """Why claim (a) falls short: the fine-tuned policies' reward minus VAS's at equal KL, the ties the prompts
    cannot separate, and what makes the comparison hard at this size; empty where no policy is within VAS's
    measured KL."""
    tuned = report.get("finetuned", [])
    vas = sorted(report["vas"], key=lambda v: v["beta"])
    gaps = {f["name"]: f["reward"] - interpolated([{**report["plain"], "kl": 0.0}] + vas, f["kl"])[0]
            for f in tuned if places[f["name"]][0] != "outside"}
    if not gaps:
        return ""
    tied = [n for n, (w, _) in places.items() if w == "tie"]
    return (f"At equal KL the fine-tuned policies' reward minus VAS's ranges from {min(gaps.values()):+.3f} to "
            f"{max(gaps.values()):+.3f}" + (f"; {len(tied)} of {len(tuned)} lie within two standard errors of VAS's "
                                           f"frontier, which {report['settings']['prompts']} held-out openings × "
                                           f"{size.vas_samples_per_prompt} samples cannot separate" if tied else "")
            + ". VAS's frontier between two β points is a straight line, which lies below a concave frontier: "
            "where its β points are far apart in KL, the comparison favours the fine-tuned policy. Every method "
            f"learns from the same {train_rows} π0 responses (or draws as many), far from the paper's 7B models "
            "trained on tens of thousands of samples.")


def cost_section(report: dict, size: Size) -> Section:
    """Claim (b), App. D.4: the largest N whose Best-of-N reward VAS reaches, and the cost ratio there; with
    observation (c): VAS against Best-of-N at equal KL."""
    plain = report["plain"]
    vas = sorted(report["vas"], key=lambda v: v["beta"])
    bon = sorted(report["best_of_n"], key=lambda b: b["n"])

    reached = [b for b in bon if b["n"] > 1 and any(reaches(v, b) for v in vas)]
    lines = []
    if not any(beats(v, plain) for v in vas):
        verdict = "inconclusive"
        text = "No β beats plain sampling beyond two standard errors: there is nothing to match."
    elif not reached:
        verdict = "not reproduced"
        best = max(vas, key=lambda v: v["reward"])
        text = (f"No β reaches Best-of-2's reward ({bon[1]['reward']:.3f} if measured) within two standard errors; "
                f"VAS's best is β={best['beta']:g}: {best['reward']:.3f}." if len(bon) > 1 else "Best-of-N has N = 1 only.")
    else:
        top = reached[-1]
        v = min((v for v in vas if reaches(v, top)), key=lambda v: v["seconds_per_prompt"])
        ratio, flop_ratio = top["seconds_per_prompt"] / v["seconds_per_prompt"], top["gflop"] / v["gflop"]
        verdict = "reproduced" if ratio > 1 else "partly reproduced"
        text = (f"The largest N whose reward VAS reaches (within two standard errors) is **N = {top['n']}** "
                f"({top['reward']:.3f} ± {top['reward_sem']:.3f}); the cheapest β that reaches it, β={v['beta']:g} "
                f"({v['reward']:.3f} ± {v['reward_sem']:.3f}), decodes in {v['seconds_per_prompt']:.2f} s per prompt "
                f"against Best-of-{top['n']}'s {top['seconds_per_prompt']:.2f} s: Best-of-{top['n']} costs "
                f"**{ratio:.2f}×** VAS's time ({flop_ratio:.2f}× its GFLOP: {top['gflop']:.0f} against {v['gflop']:.0f}).")
        if top["n"] < max(b["n"] for b in bon):
            nxt = next(b for b in bon if b["n"] > top["n"])
            text += f" Best-of-{nxt['n']} ({nxt['reward']:.3f}) is out of VAS's reach on this grid."
    for b in bon:
        if b["n"] == 1:
            continue
        where, sentence = against_vas(b, report)
        verdict_c = {"below": "below VAS at its KL bound (open at its true KL, which is lower)",
                     "above": "above VAS, also at its true KL", "tie": "ties VAS at its KL bound",
                     "outside": "beyond VAS's measured KL"}[where]
        lines.append(f"- Best-of-{b['n']} at its KL bound {b['kl']:.2f}: {sentence} → {verdict_c}.")
    body = f"""Same runs as the section above. Cost here is decoding only (the value model's training is in the table above).

{text}

**Observation (c), not a claim of the paper: VAS against Best-of-N at equal KL.** Best-of-N's KL is an upper
bound (its true KL is lower), so a Best-of-N point above VAS's frontier is above it at its true KL too.

{chr(10).join(lines)}

The paper compares VAS with Best-of-128 (App. D.4); the pool here holds {report['settings']['n_pool']} samples per prompt, so N ≤ {report['settings']['n_pool']}."""
    return Section("bon-cost", "VAS against Best-of-N: reward at decoding cost (App. D.4)",
                   "VAS matches Best-of-N's reward at a lower decoding cost.", verdict, body)


def judge_section(report: dict, judged: dict) -> Section:
    """The unoptimised judge's section: do the gains under VADER survive under TextBlob?"""
    winners = [j for j in judged["vas"] + judged["best_of_n"] + judged.get("finetuned", []) if j["reward_win_rate"] > 0.6]
    held = [j for j in winners if j["judge_win_rate"] > 0.5 + 2 * j["judge_win_rate_sem"]]
    if not winners:
        verdict = "inconclusive"  # nothing won under the optimised reward, so there is nothing to check
    else:
        verdict = "reproduced" if len(held) == len(winners) else "partly reproduced" if held else "not reproduced"

    def name(j):
        return f"VAS β={j['beta']:g}" if "beta" in j else j["name"] if "name" in j else f"Best-of-{j['n']}"

    lines = [f"| {name(j)} | {j['reward_win_rate']:.2f} ± {j['reward_win_rate_sem']:.2f} | "
             f"{j['judge_win_rate']:.2f} ± {j['judge_win_rate_sem']:.2f} | {j['reward_mean']:.3f} | {j['judge_mean']:.3f} |"
             for j in sorted(judged["best_of_n"], key=lambda j: j["n"]) + sorted(judged["vas"], key=lambda j: j["beta"])
             + list(judged.get("finetuned", []))]
    lost = [name(j) for j in winners if j not in held]
    note = ("Every method that wins under VADER (win rate > 0.6) also wins under TextBlob by more than two standard "
            "errors" if not lost else
            "Winning under VADER but not significantly under TextBlob: " + ", ".join(lost) + ". The two lexicons "
            "disagree on many short replies (TextBlob scores most of them exactly 0, a tie), so a smaller margin "
            "is expected even without reward hacking; a gap much larger for one method than for Best-of-N at the "
            "same VADER win rate would point to hacking")
    gaps = {group: [j["reward_win_rate"] - j["judge_win_rate"] for j in judged.get(key, []) if j["reward_win_rate"] > 0.6]
            for group, key in (("VAS", "vas"), ("Best-of-N", "best_of_n"), ("the fine-tuned policies", "finetuned"))}
    measured = [f"{sum(g) / len(g):.2f} for {group}" for group, g in gaps.items() if g]
    gap_note = (" Among the points that win under VADER, the win rate drops from VADER to TextBlob by "
                + ", ".join(measured) + " on average." if measured else "")
    body = f"""Same responses as the frontier above, also scored by TextBlob polarity (a pattern-lexicon sentiment
scorer, in [−1, 1], that neither the value model, Best-of-N's selection nor the fine-tuning saw). Win rate
against plain π0 samples of the same prompt, ties ½, ± s.e. over {report['settings']['prompts']} prompts; Best-of-N by an unbiased
estimator over the pool (its best of N against pool samples outside those N, so N = {report['settings']['n_pool']} has no row; its
VADER win rate is N/(N+1) by construction when rewards do not tie). Plain π0's
mean TextBlob score is {judged['plain']['judge_mean']:.3f}.

| method | win rate, VADER (optimised) | win rate, TextBlob (judge) | mean VADER | mean TextBlob |
|---|---|---|---|---|
{chr(10).join(lines)}

{note}.{gap_note} The right panel of the frontier plot shows the same numbers: points on the dotted diagonal
win as often under the judge as under the reward they were selected or trained for."""
    return Section("judge", "A judge that was not optimised (Sec. 4's win rates, App. E)",
                   "The gains in the optimised reward (VAS's, Best-of-N's and the fine-tuned policies') also show as "
                   "wins under a judge no method was optimised for, i.e. they are not reward hacking.", verdict, body)
