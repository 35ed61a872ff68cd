"""`vas experiment`: the report's section bookkeeping, the statistics behind the verdicts (by hand), and a
seconds-long run of the β-knob experiment on the tiny model."""

import csv
import dataclasses
import json

import pytest
import torch

from vas.errors import VasError
from vas.experiments import ablations, beta_knob, composition, frontier, tool_use
from vas.experiments.report import HEADER, VERDICTS, Section, write_section
from vas.rewards import load_reward


def test_sections_are_appended_replaced_and_kept(tmp_path):
    report = tmp_path / "REPORT.md"
    write_section(report, Section("a", "A", "claim a", "reproduced", "first body"))
    write_section(report, Section("b", "B", "claim b", "not reproduced", "b body"))
    write_section(report, Section("a", "A", "claim a", "partly reproduced", "second body"))
    text = report.read_text()
    assert text.startswith(HEADER)
    assert "first body" not in text and "second body" in text and "b body" in text
    assert text.index("## A") < text.index("## B")  # a replaced section keeps its place
    assert text.count("<!-- section: a -->") == 1 and "**Verdict: partly reproduced.**" in text
    # the summary below the header lists every section's claim and current verdict, in order
    assert "| A | claim a | **partly reproduced** |\n| B | claim b | **not reproduced** |" in text
    assert text.index("<!-- summary -->") < text.index("## A") and text.count("<!-- summary -->") == 1
    with pytest.raises(ValueError, match="verdict must be one of"):
        write_section(report, Section("c", "C", "claim", "maybe", "body"))


def test_spearman_by_hand():
    assert beta_knob.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert beta_knob.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks of y: [1, 3, 2, 4]; d = [0, 1, 1, 0]; ρ = 1 − 6·Σd² / (n(n²−1)) = 1 − 12/60
    assert beta_knob.spearman([1, 2, 3, 4], [5, 9, 7, 11]) == pytest.approx(0.8)


def test_significant_decreases_by_hand():
    rows = [{"beta": 2.0, "words": 50.0, "words_sem": 1.0}, {"beta": 0.0, "words": 40.0, "words_sem": 1.0},
            {"beta": 1.0, "words": 55.0, "words_sem": 1.0}, {"beta": 4.0, "words": 52.0, "words_sem": 3.0}]
    # in β order: 40 → 55 → 50 (drop 5 > 2·√2 ≈ 2.83: significant) → 52
    assert beta_knob.significant_decreases(rows) == [(1.0, 2.0)]


def test_beta_knob_quick_run(tiny_model_dir, tmp_path):
    [section] = beta_knob.run(tmp_path / "beta-knob", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
                              size=beta_knob.QUICK, progress=False, log=lambda _: None)
    out = tmp_path / "beta-knob"
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "generations.csv", newline="") as f:
        generations = list(csv.DictReader(f))
    assert sorted({float(g["beta"]) for g in generations}) == list(beta_knob.QUICK.betas)
    for row in summary["rows"]:  # each β's mean length, recomputed from the saved responses
        words = [len(g["response"].split()) for g in generations if float(g["beta"]) == row["beta"]]
        assert len(words) == beta_knob.QUICK.eval_topics
        assert row["words"] == pytest.approx(sum(words) / len(words))
    assert (out / "words_vs_beta.png").read_bytes()[:4] == b"\x89PNG"
    assert section.verdict in VERDICTS
    assert f"**{summary['spearman']:.2f}**" in section.body


def test_matmul_flops_per_token_by_hand(tiny_model_dir):
    from vas.models import load_policy

    policy = load_policy(tiny_model_dir)
    # per layer: q, o 32×32; k, v 32×16 (2 KV heads of 8); gate, up, down 32×64; two norms of 32
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    vocab = policy.config.vocab_size
    expected = 2 * (2 * layer + 32 + vocab * 32)  # 2 layers, final norm, untied LM head
    assert frontier.matmul_flops_per_token(policy) == expected
    assert frontier.matmul_flops_per_token(policy.model) == 2 * (2 * layer + 32)  # no LM head


def test_frontier_quick_run(tiny_model_dir, tmp_path):
    sections = frontier.run(tmp_path / "frontier", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
                            size=frontier.QUICK, progress=False, log=lambda _: None)
    assert [s.name for s in sections] == ["frontier", "judge"]
    out = tmp_path / "frontier"
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "judged_responses.jsonl").read_text().splitlines()]
    size = frontier.QUICK
    assert len([r for r in rows if r["method"] == "vas"]) == len(size.betas) * size.eval_prompts * size.vas_samples_per_prompt
    pool = {(r["prompt_index"], r["sample"]): r["judge"] for r in rows if r["method"] == "plain"}
    n_pool = max(size.best_of)
    for entry in summary["judged"]["vas"]:  # the judge's win rate, recounted from the saved scores
        wins = []
        for r in rows:
            if r["method"] == "vas" and r["beta"] == entry["beta"]:
                others = [pool[r["prompt_index"], s] for s in range(n_pool)]
                wins.append(sum(1.0 if r["judge"] > o else 0.5 if r["judge"] == o else 0.0 for o in others) / n_pool)
        assert entry["judge_win_rate"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
    bon1 = next(b for b in summary["judged"]["best_of_n"] if b["n"] == 1)
    assert bon1["judge_win_rate"] == pytest.approx(0.5, abs=1e-6) and bon1["reward_win_rate"] == pytest.approx(0.5, abs=1e-6)
    flops = summary["flops_per_token"]
    for entry in summary["report"]["vas"]:
        assert entry["gflop"] == pytest.approx((entry["policy_tokens"] * flops["policy"]
                                                + entry["value_tokens"] * flops["value"]) / 1e9)
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert all(s.verdict in VERDICTS for s in sections)
    stages = list((tmp_path / "stages").iterdir())
    assert len(stages) == 1 and (stages[0] / "samples").is_dir()
    # a rerun reuses the stages and the evaluation
    logs = []
    frontier.run(tmp_path / "frontier", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
                 size=frontier.QUICK, progress=False, log=logs.append)
    assert any(line.startswith("evaluation: reusing") for line in logs)
    assert any(line.startswith("value model: reusing") for line in logs)


def test_ablation_verdicts_by_hand():
    worse = ablations.worse
    assert worse(-0.05, 0.02, 0.0, 0.1) == "reproduced"  # less reward, same KL
    assert worse(0.0, 0.02, 1.0, 0.2) == "reproduced"  # same reward, more KL
    assert worse(0.05, 0.02, 0.0, 0.1) == "not reproduced" and worse(0.0, 0.02, -1.0, 0.2) == "not reproduced"
    assert worse(-0.05, 0.02, -1.0, 0.2) == "inconclusive"  # less reward for less KL: a trade
    assert worse(-0.03, 0.02, 0.1, 0.1) == "inconclusive"  # within noise
    assert ablations.verdict_of(["reproduced", "reproduced"]) == "reproduced"
    assert ablations.verdict_of(["reproduced", "inconclusive"]) == "partly reproduced"
    assert ablations.verdict_of(["not reproduced", "inconclusive"]) == "not reproduced"
    assert ablations.verdict_of(["inconclusive", "inconclusive"]) == "inconclusive"


def test_ablations_quick_run(tiny_model_dir, tmp_path):
    size = ablations.QUICK
    sections = ablations.run(tmp_path / "ablations", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
                             size=size, progress=False, log=lambda _: None)
    assert [s.name for s in sections] == ["ablations-targets", "ablations-top-k", "ablations-data"]
    assert all(s.verdict in VERDICTS for s in sections)
    out = tmp_path / "ablations"
    summary = json.loads((out / "summary.json").read_text())
    names = [r["condition"] for r in summary["rows"]]
    assert len(names) == len(ablations.conditions(size)) == 7  # reference, 3 targets, masked, 2 k
    reference = summary["rows"][0]
    assert reference["delta"] == 0.0
    conditions = ablations.conditions(size)
    first = json.loads((out / "conditions" / f"{conditions[0].slug}.json").read_text())
    for condition, row in zip(conditions, summary["rows"]):  # reward and paired Δ, recomputed from the saved rewards
        saved = json.loads((out / "conditions" / f"{condition.slug}.json").read_text())
        assert len(saved["texts"]) == size.eval_prompts * size.samples_per_prompt
        assert row["reward"] == pytest.approx(sum(saved["positivity"]) / size.eval_prompts, abs=1e-6)
        diffs = [a - b for a, b in zip(saved["positivity"], first["positivity"])]
        assert row["delta"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-6)
    td0 = json.loads((out / "conditions" / "prompts4-lam0-k10.json").read_text())["positivity"]
    td_lambda = json.loads((out / "conditions" / "prompts4-lam0.95-k10.json").read_text())["positivity"]
    assert summary["targets"]["td0_minus_td_lambda_positivity"][0] == pytest.approx(
        sum(a - b for a, b in zip(td0, td_lambda)) / len(td0), abs=1e-6)
    # a rerun with other settings in the same folder is refused, not mixed in
    with pytest.raises(VasError, match="other settings"):
        ablations.run(out, base_model=tiny_model_dir, device=torch.device("cpu"), seed=1, size=size, progress=False,
                      log=lambda _: None)
    # value models: the full-data TD(λ) one, and TD(λ), TD(0), Monte-Carlo on the first 4 prompts
    stage = next((tmp_path / "stages").iterdir())
    assert len(list(stage.glob("value-*"))) == 4
    assert (out / "ablations.png").read_bytes()[:4] == b"\x89PNG"
    labels = json.loads((out / "halfway_labels.json").read_text())
    assert len(labels["labels"]) == size.eval_prompts


def test_composition_quick_run(tiny_model_dir, tmp_path):
    size = composition.QUICK
    [section] = composition.run(tmp_path / "composition", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
                                size=size, progress=False, log=lambda _: None)
    out = tmp_path / "composition"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["condition"] for r in summary["rows"]] == ["plain", "positivity alone, β=4", "brevity alone, β=4",
                                                         "both (equal weights), β=4"]
    plain = json.loads((out / "conditions" / "plain.json").read_text())
    both = json.loads((out / "conditions" / "both-beta4.json").read_text())
    for name in ("positivity", "brevity"):  # rewards recomputed from the saved texts; Δ paired over prompts
        texts = both["texts"]
        scored = load_reward(name)(["p"] * len(texts), texts).view(size.eval_prompts, size.samples_per_prompt).mean(1)
        assert both[name] == pytest.approx(scored.tolist(), abs=1e-6)
        row = summary["rows"][3]
        diffs = [a - b for a, b in zip(both[name], plain[name])]
        assert row[f"{name}_delta"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-6)
    assert plain["kl"] == [0.0] * size.eval_prompts and summary["rows"][3]["kl"] > 0
    # the two value models were trained on the same samples, each on its own reward
    configs = [json.loads((d / "vas_value_config.json").read_text()) for d in next((tmp_path / "stages").iterdir()).glob("value-*")]
    assert sorted(c["reward"] for c in configs) == ["brevity", "positivity"]
    assert section.verdict in VERDICTS and (out / "composition.png").read_bytes()[:4] == b"\x89PNG"


def test_wilson_interval_and_tool_use_verdicts_by_hand():
    assert tool_use.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert tool_use.wilson(0, 10)[0] == 0.0 and tool_use.wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert tool_use.paired_gain([True, False, False, True], [True, True, False, False]) == (1, 1)

    def summary(one_shot, steered):
        rows = [{"condition": c, "successes": sum(w), "queries": len(w), "rate": sum(w) / len(w), "ci95": [0, 1],
                 "field_f1": 0.5, "tokens": 10, "seconds_per_query": 1.0, "outside_mass": 0.01, "wins": w}
                for c, w in (("zero-shot", one_shot), ("zero-shot + VAS", one_shot), ("one-shot", one_shot),
                             ("one-shot + VAS", steered))]
        return {"rows": rows, "training_data": {"responses": 4, "success_rate": 0.5, "reward_variance": 0.25,
                                                "validation_mse": 0.2},
                "settings": {"policy": "gemma-3-270m", "value_backbone": "smollm2-135m-instruct", "eval_queries": 25,
                             "held_out_cities": 12},
                "sizing": [{"criteria": 0, "successes": 3, "queries": 5, "field_f1": 0.5}],
                "decision_margin": {"mean": 0.01, "positive": 3, "queries": 5},
                "examples": [{"query": "q", "truth": "t", "one-shot": "a", "one-shot + VAS": "b"}]}

    base = [False] * 20 + [True] * 5
    # 9 fixed, 0 broken: 9 > 2·√9 = 6
    assert tool_use.section(summary(base, [True] * 9 + [False] * 11 + [True] * 5), tool_use.Size()).verdict == "reproduced"
    # 4 fixed, 1 broken: 3 < 2·√5
    assert tool_use.section(summary(base, [True] * 4 + [False] * 16 + [False] + [True] * 4), tool_use.Size()).verdict == "inconclusive"
    assert tool_use.section(summary([True] * 25, [False] * 25), tool_use.Size()).verdict == "not reproduced"


@pytest.mark.slow
def test_tool_use_quick_run_through_the_llama_cpp_server(tiny_model_dir, tmp_path):
    """π0 is the embedded GGUF behind llama.cpp's server; the value model is the tiny model (another tokenizer)."""
    from vas.home_search import success

    out = tmp_path / "tool-use"
    size = tool_use.QUICK
    [section] = tool_use.run(out, base_model=tiny_model_dir, device=torch.device("cpu"), seed=0, size=size,
                             progress=False, log=lambda _: None)
    summary = json.loads((out / "summary.json").read_text())
    train, held_out = tool_use.split_queries(size, 0)
    assert not {q.calls[0] for q in train} & {q.calls[0] for q in held_out}
    assert [r["condition"] for r in summary["rows"]] == [c for c, _, _ in tool_use.CONDITIONS]
    for row, (label, _, _) in zip(summary["rows"], tool_use.CONDITIONS):
        responses = [json.loads(line)["response"] for line in
                     (out / "conditions" / (label.replace(" + ", "-").replace(" ", "-") + ".jsonl")).read_text().splitlines()]
        assert row["wins"] == [success(q, r) for q, r in zip(held_out, responses)] and row["queries"] == size.eval_queries
    assert summary["training_data"]["responses"] == size.train_queries * size.recipe.samples_per_prompt
    assert [r["criteria"] for r in summary["sizing"]] == list(tool_use.SIZING)
    assert all(r["queries"] == size.sizing_queries and 0 <= r["successes"] <= r["queries"] for r in summary["sizing"])
    assert section.verdict in VERDICTS and (out / "tool_use.png").read_bytes()[:4] == b"\x89PNG"
    # the decision margin, against full forwards of the value model on each candidate's whole sequence
    from vas.home_search import prompt, value_prompt
    from vas.models import load_tokenizer
    from vas.prompts import encode_prompts
    from vas.value import ValueModel

    value, tokenizer = ValueModel.from_pretrained(out / "value").eval(), load_tokenizer(tiny_model_dir)
    margins = []
    for q in held_out:
        ids = encode_prompts(tokenizer, [value_prompt(prompt(q, one_shot=True))])[0]
        v = {}
        for word in ("buy", "rent"):
            seq = torch.tensor([ids + tokenizer(tool_use.decision_prefix(q) + word, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                v[word] = float(value(seq, torch.ones_like(seq))[0, -1])
        right = q.calls[1][1]
        margins.append(v[right] - v["rent" if right == "buy" else "buy"])
    assert summary["decision_margin"]["mean"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert summary["decision_margin"]["positive"] == sum(m > 0 for m in margins)
    # run again: every stage and condition is read back, nothing is recomputed differently
    again = tool_use.run(out, base_model=tiny_model_dir, device=torch.device("cpu"), seed=0, size=size, progress=False,
                         log=lambda _: None)
    assert again == [section] and json.loads((out / "summary.json").read_text()) == summary
    with pytest.raises(VasError, match="other settings"):
        tool_use.run(out, base_model=tiny_model_dir, device=torch.device("cpu"), seed=1, size=size, progress=False,
                     log=lambda _: None)


def test_tool_use_check_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(VasError, match=r"pip install 'value-augmented-sampling\[tool-use\]'"):
        tool_use.check(tool_use.QUICK)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(VasError, match="no GGUF model"):
        tool_use.check(dataclasses.replace(tool_use.QUICK, policy="missing.gguf"))
