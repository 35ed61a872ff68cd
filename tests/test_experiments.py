"""`vas experiment`: the report's section bookkeeping, the statistics behind the verdicts (by hand), and a
seconds-long run of the β-knob experiment on the tiny model."""

import csv
import json

import pytest
import torch

from vas.experiments import beta_knob
from vas.experiments.report import HEADER, Section, write_section


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
    section = beta_knob.run(tmp_path / "beta-knob", base_model=tiny_model_dir, device=torch.device("cpu"), seed=0,
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
    assert section.verdict in ("reproduced", "partly reproduced", "not reproduced")
    assert f"**{summary['spearman']:.2f}**" in section.body
