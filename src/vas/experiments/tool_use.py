"""Teaching a black-box model tool use (paper Sec. 4.4, Table 2): the Home Search API through an
OpenAI-compatible endpoint.

π0 is Gemma-3-270M base (``Size.policy``) served by llama-cpp-python's server on 127.0.0.1 and used only
through the API: whole responses for collection, the top-k next tokens with their log-probabilities for
decoding. Its responses to the training queries' one-shot prompts are collected through the API (τ = 0.7)
and rewarded 1 for a correct call sequence (:mod:`vas.experiments.home_search`). A value model on another model's
backbone and tokenizer (the embedded SmolLM2, ``--base-model``), reading only the query and the prompt form,
is trained on them. On held-out queries each prompt form is decoded greedily (Sec. 4.4: the token with the
highest combined score) without and with VAS, one request per token.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vas.config import EMBEDDED_MODEL
from vas.experiments.report import Section, pyplot, save_figure
from vas.experiments.home_search import LOCATIONS
from vas.pipeline import Recipe

NAME = "tool-use"


@dataclass(frozen=True)
class Size:
    """How big each stage is (defaults: about 36 minutes on 2 CPU cores, most of it one request per token)."""

    policy: str = "gemma-3-270m"  # π0: a GGUF served by llama.cpp (vas.models.gguf_file)
    criteria: int = 0  # chosen by the sizing measurement (summary.json "sizing"): 10–60 % one-shot
    sizing_queries: int = 24  # per size in SIZING
    train_queries: int = 128
    eval_queries: int = 48
    recipe: Recipe = Recipe(samples_per_prompt=4, max_new_tokens=48, backbone_layers=8)
    beta: float = 8.0
    top_k: int = 5  # Sec. 4.4: GPT-3.5's top-5 log-probabilities
    concurrency: int = 1  # llama.cpp serves one request at a time; interleaving evicts its prompt cache


QUICK = Size(policy=EMBEDDED_MODEL, sizing_queries=1, train_queries=3, eval_queries=2,
             recipe=Recipe(samples_per_prompt=1, max_new_tokens=6, epochs=1.0, batch_size=4, backbone_layers=1))

HELD_OUT_CITIES = LOCATIONS[::4]  # 12 of the 48: no training query names them
SIZING = (0, 1, 2)  # extra criteria tried when sizing the task
STOP = ("\n\n", "Task:")  # the end of one answer in the prompt's format

CONDITIONS = (("zero-shot", False, False), ("zero-shot + VAS", False, True), ("one-shot", True, False),
              ("one-shot + VAS", True, True))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a success rate ``successes / n``."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def split_queries(size: Size, seed: int) -> tuple[list, list]:
    """(training queries, held-out queries): the held-out ones are set in cities no training query names
    (:data:`HELD_OUT_CITIES`), so no held-out prompt was seen in training. Both lists are distinct queries."""
    from vas.experiments.home_search import generate_queries

    train = generate_queries(size.train_queries, criteria=size.criteria, seed=seed,
                             locations=[c for c in LOCATIONS if c not in HELD_OUT_CITIES])
    return train, generate_queries(size.eval_queries, criteria=size.criteria, seed=seed + 1, locations=HELD_OUT_CITIES)


def sized(policy: Callable, size: Size, seed: int, folder: Path, log: Callable[[str], None], *,
          progress: bool) -> list[dict]:
    """One-shot π0's greedy success at each number of extra criteria in :data:`SIZING`, on
    ``size.sizing_queries`` fresh queries each: the measurement behind ``size.criteria`` (targeted:
    10–60 %, room for VAS to move). ``policy()`` makes an :class:`vas.policy.api.ApiPolicy`; the responses are kept in ``folder``.

    Returns:
        One dict per size: criteria, successes, queries, field_f1 (mean).
    """
    from vas.experiments.home_search import field_f1, generate_queries, prompt, success

    rows = []
    for criteria in SIZING:
        queries = generate_queries(size.sizing_queries, criteria=criteria, seed=seed + 2 + criteria)
        answers = [r["response"] for r in greedy_responses(policy(), [prompt(q, one_shot=True) for q in queries],
                                                           folder / f"criteria{criteria}.jsonl",
                                                           max_new_tokens=size.recipe.max_new_tokens,
                                                           progress=progress)]
        rows.append({"criteria": criteria, "successes": sum(success(q, a) for q, a in zip(queries, answers)),
                     "queries": len(queries), "field_f1": sum(field_f1(q, a) for q, a in zip(queries, answers)) / len(queries)})
        log(f"sizing: one-shot π0, {criteria} extra criteria: {rows[-1]['successes']}/{len(queries)} correct")
    return rows


def cached(path: Path, prompts: list[str]) -> list[dict]:
    """The rows kept in ``path``, if they answer exactly ``prompts``.

    Raises:
        VasError: if they answer other prompts (the query generator or the prompt changed since).
    """
    from vas.errors import VasError

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if [r["prompt"] for r in rows] != prompts:
        raise VasError(f"{path} holds responses to other prompts: delete {path.parent.parent} to start over")
    return rows


def greedy_responses(policy, prompts: list[str], path: Path, *, max_new_tokens: int, progress: bool) -> list[dict]:
    """π0's greedy response to each prompt, one request each (temperature 0, :func:`vas.decoding.batches.sample_responses`),
    kept in ``path`` (JSON lines; resumable); closes ``policy``. At every step that is the token VAS at β = 0
    would pick, since π0's argmax is always in its top-k. Its rows have no ``outside_mass`` (not asked for)."""
    from vas.decoding.batches import sample_responses

    if path.exists():
        return cached(path, prompts)
    return sample_responses(policy, prompts, path, temperature=0.0, max_new_tokens=max_new_tokens, concurrency=1,
                            progress=progress, desc="greedy")


def decision_prefix(query) -> str:
    """A right answer to ``query`` up to the token that decides most one-shot answers: buy or rent (π0 copies
    the example's, which is right half of the time)."""
    return f"API.set_location({query.calls[0][1]!r})\nAPI.set_buy_or_rent('"


def decision_margin(value, tokenizer, queries) -> dict:
    """The value model at that decision: V(s ⊕ right) − V(s ⊕ wrong) on each one-shot prompt, where s is
    :func:`decision_prefix` and right, wrong are ``buy`` and ``rent`` (a diagnostic of what VAS can do there:
    β times the margin, in nats, is what it adds to the right token's log-probability over the wrong one's).

    Returns:
        mean (the margin, in reward units, averaged over queries), positive (how many margins are > 0), queries.
    """
    from vas.experiments.home_search import prompt, value_prompt
    from vas.prompts import encode_prompts
    from vas.value.scorers import TextCandidateScorer

    margins = []
    for q in queries:
        right = q.calls[1][1]
        wrong = "rent" if right == "buy" else "buy"
        scorer = TextCandidateScorer(value, tokenizer, encode_prompts(tokenizer, [value_prompt(prompt(q, one_shot=True))])[0])
        with torch.no_grad():
            prefix = decision_prefix(q)
            v = scorer.score(prefix, [prefix + right, prefix + wrong])
        margins.append(float(v[0] - v[1]))
    return {"mean": sum(margins) / len(margins), "positive": sum(m > 0 for m in margins), "queries": len(margins)}


def check(size: Size) -> Path:
    """Fail in one line before anything runs (`vas experiment all` runs this experiment last) if π0's GGUF or
    llama-cpp-python's server is not installed; else return the GGUF file.

    Raises:
        VasError: naming what to install.
    """
    import importlib.util

    from vas.errors import VasError
    from vas.models import gguf_file

    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette",
                                                          "starlette_context")):
        raise VasError("the tool-use experiment serves π0 with llama-cpp-python: pip install "
                       "'value-augmented-sampling[tool-use]' (or 'llama-cpp-python[server]')")
    return gguf_file(size.policy)


def run(out: Path, *, base_model: str, device: torch.device, seed: int, size: Size, progress: bool,
        log: Callable[[str], None]) -> list[Section]:
    """Serve π0 (``size.policy``), collect through the API, train the value model on ``base_model``'s backbone
    (each reused if present under ``out``), decode the four conditions (kept in ``out/conditions/``), write
    ``summary.json`` and ``tool_use.png``, return the section.

    Raises:
        VasError: if π0's GGUF is not installed (:func:`vas.models.gguf_file`), or the server fails.
    """
    from vas.policy.api import LLAMA_CPP_UNTRUNCATED, ApiPolicy, Endpoint
    from vas.pipeline import claim
    from vas.experiments.home_search import HomeSearchReward
    from vas.models import load_tokenizer
    from vas.pipeline import trained_value_model
    from vas.processes import llama_cpp_server
    from vas.storage import write_json_atomic
    from vas.value.model import ValueModel

    gguf = check(size)
    claim(out, size, seed=seed, base_model=base_model)
    train, held_out = split_queries(size, seed)
    reward = HomeSearchReward(train)
    tokenizer = load_tokenizer(base_model)
    recipe = size.recipe
    # all cores to the server: it and the value model take turns, never run at once (concurrency 1)
    with llama_cpp_server(gguf, n_threads=os.cpu_count()) as url:
        def policy():  # raw completions: π0 is a base model, prompted in the paper's format
            return ApiPolicy(Endpoint(url, size.policy, extra_body=LLAMA_CPP_UNTRUNCATED, stop=STOP, stream=True))

        sizing = sized(policy, size, seed, out / "sizing", log, progress=progress)
        data = training_data(policy, train, reward, out / "samples", tokenizer, size, seed,
                             progress=progress, log=log)
        value_dir = trained_value_model(out / "value", data, tokenizer=tokenizer, base_model=base_model, recipe=recipe,
                                        seed=seed, device=device, progress=progress, log=log)
        value = ValueModel.from_pretrained(value_dir, device=device).eval()
        rows, wins = decode_conditions(policy, held_out, value, out / "conditions", size, seed, progress=progress,
                                       log=log)
        margin = decision_margin(value, tokenizer, held_out)

    table = condition_table(held_out, rows, wins)
    rate = sum(data["reward"]) / len(data)
    training = {"responses": len(data), "success_rate": rate, "reward_variance": rate * (1 - rate),
                "validation_mse": value.value_config.get("metrics", {}).get("eval_final_mse")}
    summary = {"settings": {"policy": size.policy, "value_backbone": base_model, "criteria": size.criteria,
                            "held_out_cities": len(HELD_OUT_CITIES), "train_queries": size.train_queries,
                            "eval_queries": size.eval_queries, "beta": size.beta, "top_k": size.top_k,
                            "recipe": recipe.__dict__, "seed": seed},
               "training_data": training, "sizing": sizing, "decision_margin": margin, "rows": table,
               "examples": [{"query": held_out[0].text, "truth": held_out[0].call_text(),
                             **{label: rows[label][0]["response"] for label, _, _ in CONDITIONS}}]}
    write_json_atomic(out / "summary.json", summary)
    plot(table, out / "tool_use.png")
    return [section(summary, size)]


def training_data(policy: Callable, train: list, reward, samples: Path, tokenizer, size: Size, seed: int, *,
                  progress: bool, log: Callable[[str], None]):
    """π0's scored one-shot responses to the training queries, collected through the API into ``samples``
    (:func:`vas.collect.collect`), or read back from it where an earlier run collected them."""
    from vas.collect import REQUIRED_FOR_TRAINING, collect
    from vas.config import CollectConfig
    from vas.experiments.home_search import prompt, value_prompt
    from vas.storage import load_dataset_dir

    recipe = size.recipe
    if samples.exists():
        log(f"samples: reusing {samples}")
        return load_dataset_dir(samples, REQUIRED_FOR_TRAINING)
    log(f"collecting {len(train)} one-shot queries × {recipe.samples_per_prompt} through the API → {samples}")
    return collect(policy(), [prompt(q, one_shot=True) for q in train], reward, samples,
                   CollectConfig(samples_per_prompt=recipe.samples_per_prompt, max_new_tokens=recipe.max_new_tokens,
                                 seed=seed),
                   value_tokenizer=tokenizer, concurrency=size.concurrency, value_prompt=value_prompt, progress=progress,
                   metadata={"policy": size.policy, "task": "home-search", "criteria": size.criteria})


def decode_conditions(policy: Callable, held_out: list, value, folder: Path, size: Size, seed: int, *,
                      progress: bool, log: Callable[[str], None]) -> tuple[dict[str, list[dict]], dict[str, list]]:
    """Each of :data:`CONDITIONS` decoded greedily on the held-out queries, π0 alone or steered by ``value``
    (VAS at ``size.beta``, one request per token), kept in ``folder`` and reused from it. Returns, by condition,
    the responses' rows (:func:`vas.decoding.batches.generate`'s) and whether each is a success."""
    from vas.decoding.loop import Steering
    from vas.experiments.home_search import prompt, success, value_prompt
    from vas.decoding.batches import generate

    rows, wins = {}, {}
    for label, one_shot, vas in CONDITIONS:
        path = folder / (label.replace(" + ", "-").replace(" ", "-") + ".jsonl")
        prompts = [prompt(q, one_shot=one_shot) for q in held_out]
        if vas and path.exists():  # finished earlier: an interrupted experiment resumes
            rows[label] = cached(path, prompts)
        elif vas:
            steering = Steering([value], beta=size.beta, top_k=size.top_k, value_prompt=value_prompt)
            # temperature 1: the argmax of log π0 + β·V, with π0's own log-probabilities (Sec. 4.4)
            rows[label] = generate(policy(), prompts, steering, path, temperature=1.0,
                                   max_new_tokens=size.recipe.max_new_tokens, greedy=True, seed=seed,
                                   concurrency=size.concurrency, progress=progress)
        else:
            rows[label] = greedy_responses(policy(), prompts, path, max_new_tokens=size.recipe.max_new_tokens,
                                           progress=progress)
        wins[label] = [success(q, r["response"]) for q, r in zip(held_out, rows[label])]
        log(f"{label}: {sum(wins[label])}/{len(held_out)} correct")
    return rows, wins


def condition_table(held_out: list, rows: dict[str, list[dict]], wins: dict[str, list[bool]]) -> list[dict]:
    """One summary row per condition (``rows`` and ``wins`` from :func:`decode_conditions`): successes (and
    ``wins``, per query), success rate with its Wilson interval, field F1, tokens, seconds per query and π0's mass
    outside the top-k (None where not asked for)."""
    from vas.experiments.home_search import field_f1

    table = []
    for label, _, _ in CONDITIONS:
        n = len(held_out)
        low, high = wilson(sum(wins[label]), n)
        table.append({"condition": label, "successes": sum(wins[label]), "queries": n, "rate": sum(wins[label]) / n,
                      "ci95": [low, high],
                      "field_f1": sum(field_f1(q, r["response"]) for q, r in zip(held_out, rows[label])) / n,
                      "tokens": sum(r["tokens"] for r in rows[label]) / n,
                      "seconds_per_query": sum(r["seconds"] for r in rows[label]) / n,
                      "outside_mass": (sum(r["outside_mass"] for r in rows[label]) / n
                                       if rows[label][0].get("outside_mass") is not None else None),
                      "wins": wins[label]})
    return table


def plot(table: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    x = range(len(table))
    rates = [r["rate"] for r in table]
    errors = [[r["rate"] - r["ci95"][0] for r in table], [r["ci95"][1] - r["rate"] for r in table]]
    ax.bar(x, rates, yerr=errors, capsize=4, color=["#bbbbbb", "#4477aa", "#bbbbbb", "#4477aa"])
    for i, r in enumerate(table):
        ax.annotate(f"{r['successes']}/{r['queries']}", (i, r["ci95"][1]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=9)
    ax.set_xticks(list(x), [r["condition"] for r in table])
    ax.set_ylabel("success rate on held-out queries (95 % Wilson CI)")
    ax.set_ylim(0, 1)
    ax.set_title("Home Search API calls through the API (Table 2 analogue)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def paired_gain(base: list[bool], steered: list[bool]) -> tuple[int, int]:
    """(queries only the steered condition got right, queries only the base condition got right)."""
    return (sum(s and not b for b, s in zip(base, steered)), sum(b and not s for b, s in zip(base, steered)))


def section(summary: dict, size: Size) -> Section:
    rows = {r["condition"]: r for r in summary["rows"]}
    lines = "\n".join(
        f"| {r['condition']} | {r['successes']}/{r['queries']} | {100 * r['rate']:.1f} % | "
        f"{100 * r['ci95'][0]:.0f}–{100 * r['ci95'][1]:.0f} % | {r['field_f1']:.2f} | {r['tokens']:.1f} | "
        f"{r['seconds_per_query']:.1f} | {'—' if r['outside_mass'] is None else format(r['outside_mass'], '.3f')} |"
        for r in summary["rows"])
    gains = {shots: paired_gain(rows[shots]["wins"], rows[f"{shots} + VAS"]["wins"]) for shots in ("zero-shot", "one-shot")}
    fixed, broke = gains["one-shot"]
    noise = 2 * math.sqrt(fixed + broke)  # two standard deviations of fixed − broke under no effect (sign test)
    verdict = ("reproduced" if fixed - broke > noise else "not reproduced" if broke - fixed > noise
               else "inconclusive")
    one = rows["one-shot"]["rate"]
    band = ("inside" if 0.1 <= one <= 0.6 else "outside")
    example = summary["examples"][0]
    t = summary["training_data"]
    settings = summary["settings"]
    zero_shot = f"{rows['zero-shot']['successes']}/{rows['zero-shot']['queries']}"
    m = summary["decision_margin"]
    mse = "—" if t.get("validation_mse") is None else f"{t['validation_mse']:.3f}"
    sizing = ", ".join(f"{r['successes']}/{r['queries']} correct with {r['criteria']}" for r in summary["sizing"])
    body = f"""`vas experiment {NAME}`: π0 is {settings['policy']} (a GGUF served by llama-cpp-python's
OpenAI-compatible server on 127.0.0.1), used only through the API: whole responses for collection, the top-{size.top_k}
log-probabilities of the next token for decoding (Sec. 4.4 used GPT-3.5's top 5). Queries have a location, buy or
rent (said one of three ways), and {size.criteria} more criteria; the reward is 1 for the exact call sequence.
The number of criteria was sized on fresh queries (greedy one-shot π0: {sizing}; the target was 10–60 %, room for VAS to move).
The {settings['eval_queries']} held-out queries (distinct) are set in {settings['held_out_cities']} cities that no
training query names; the examples' cities are never a query's. The one-shot prompt shows a
worked example with as many criteria, for another location, whose buy-or-rent is drawn independently of the
query's (the paper does not give its example; small models copy a fixed one whole). The value model has another
model's backbone and tokenizer ({settings['value_backbone']}, {size.recipe.backbone_layers} layers, LoRA r =
{size.recipe.lora_rank}, TD(λ)) and reads only the query and the prompt form, re-tokenizing π0's text. It is
trained on {t['responses']} one-shot responses collected through the API ({size.train_queries} queries ×
{size.recipe.samples_per_prompt}, τ = 0.7, {100 * t['success_rate']:.1f} % of them correct); zero-shot responses
were not collected: without an example π0 does not write API calls ({zero_shot} right on the held-out
queries), so they would carry no signal. Held-out:
{size.eval_queries} queries, greedy decoding (Sec. 4.4: the token with the highest combined score): π0 alone in
one request per response (its argmax is always among its top-k, so this is VAS at β = 0), VAS at
β = {size.beta:g} in one request per token.

| condition | correct | success rate | 95 % CI (Wilson) | field F1 | tokens | s / query | π0 mass outside top-k |
|---|---|---|---|---|---|---|---|
{lines}

![tool use]({NAME}/tool_use.png)

Paired over the same queries, VAS fixed {gains['zero-shot'][0]} and broke {gains['zero-shot'][1]} zero-shot answers, and
fixed {gains['one-shot'][0]} and broke {gains['one-shot'][1]} one-shot answers (the claim needs the fixes to exceed
the breaks by more than two standard deviations of a sign test). The one-shot base rate is
{100 * one:.0f} %, {band} the 10–60 % band the task was sized for.

What VAS can do at the token that decides most one-shot answers (buy or rent, after the right location;
π0 tends to copy the example's): the value model's margin V(right) − V(wrong) there is {m['mean']:+.3f} on
average over the held-out queries, positive on {m['positive']}/{m['queries']}, so β·margin adds
{size.beta * m['mean']:+.2f} nats to the right token's log-probability over the wrong one's. On the
finished responses of its held-out training prompts the value model's MSE is {mse} against a reward variance
of {t['reward_variance']:.3f}.

First held-out query: “{example['query']}”; truth:
```
{example['truth']}
```
one-shot: `{example['one-shot'][:200]!r}`; one-shot + VAS: `{example['one-shot + VAS'][:200]!r}`.

Data: `{NAME}/summary.json`, every response in `{NAME}/conditions/`."""
    return Section(NAME, "Teaching a black-box model tool use through its API (Sec. 4.4, Table 2)",
                   "VAS, given only the top-k log-probabilities of an API model, raises its success rate at calling "
                   "the Home Search API, on top of a one-shot example.", verdict, body)
