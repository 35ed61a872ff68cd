"""The ``vas`` command on bad input: one line naming the problem, exit status 2, nothing half-written.
Runs the real entry point in a subprocess, as a user would."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from helpers import random_value_model

from vas.models import load_tokenizer


def vas(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "vas", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def value_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("value") / "v"
    random_value_model(tiny_model_dir).save_pretrained(path, tokenizer=load_tokenizer(tiny_model_dir))
    return path


def make_cases(tmp, tiny, other, value_dir):
    (tmp / "empty.txt").write_text("")
    (tmp / "taken.jsonl").write_text("keep me\n")
    (tmp / "nan.py").write_text("def reward(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    datasets.Dataset.from_dict({"prompt_ids": [[1]], "reward": [1.0]}).save_to_disk(str(tmp / "bad-data"))
    datasets.Dataset.from_dict({"prompt_ids": [[1, 2]] * 4, "response_ids": [[3]] * 4, "reward": [1.0] * 4,
                                "prompt_index": [0, 1, 2, 3]}).save_to_disk(str(tmp / "good-data"))
    return {
        "missing model": (["collect", "--quiet", "--out", tmp / "o1", "--limit", 2, "--base-model", tmp / "nope"],
                          "does not exist", tmp / "o1"),
        "invalid model": (["generate", "--prompt", "hi", "--base-model", tmp], "has no tokenizer_config.json", None),
        "empty prompts": (["collect", "--quiet", "--out", tmp / "o2", "--prompts", tmp / "empty.txt", "--base-model", tiny],
                          "has no prompts", tmp / "o2"),
        "long prompt": (["generate", "--prompt", "hello " * 300, "--base-model", tiny], "exceeds the context window", None),
        "k zero": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", value_dir, "-k", 0],
                   "--top-k must be an integer ≥ 1 or 'all', got '0'", None),
        "k a word": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", value_dir, "-k", "many"],
                     "--top-k must be an integer ≥ 1 or 'all', got 'many'", None),
        "k all, last head": (["evaluate", "--base-model", tiny, "--value", value_dir, "-k", "all", "--out", tmp / "o8"],
                             "--top-k all needs value models with the next head", tmp / "o8"),
        "k too big": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", value_dir, "-k", 100000],
                      "--top-k must be between 1 and the vocabulary size 300", None),
        "non-finite reward": (["collect", "--quiet", "--out", tmp / "o3", "--limit", 2, "--max-new-tokens", 3, "--base-model", tiny,
                               "--reward", "py:nan:reward"], "non-finite value", tmp / "o3"),
        "not a value model": (["evaluate", "--base-model", other, "--value", tmp, "--out", tmp / "o6", "--limit", 2],
                              "is not a value model folder", tmp / "o6"),
        "value backbone without API": (["collect", "--quiet", "--out", tmp / "o7", "--limit", 2, "--base-model", tiny,
                                        "--value-backbone", tiny], "--value-backbone is for collecting through an API",
                                       tmp / "o7"),
        "API extra not JSON": (["generate", "--prompt", "hi", "--api-base-url", "http://127.0.0.1:9/v1", "--api-extra", "{x"],
                               "--api-extra must be a JSON object", None),
        "negative limit": (["collect", "--quiet", "--out", tmp / "o5", "--limit", -1], "--start must be ≥ 0 and --limit ≥ 1, got 0 and -1", tmp / "o5"),
        "output exists": (["generate", "--prompt", "hi", "--base-model", tiny, "--out", tmp / "taken.jsonl"],
                          "exists already", None),
        "missing value model": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", tmp / "nope=2"],
                                "nope' does not exist", None),
        "non-finite beta": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", value_dir, "--beta", "nan"],
                            "must be finite", None),
        "missing data": (["train", "--quiet", "--data", tmp / "nope", "--out", tmp / "o4"], "nope' does not exist",
                         tmp / "o4"),
        "missing columns": (["train", "--quiet", "--data", tmp / "bad-data", "--out", tmp / "o4"],
                            "lacks required columns: response_ids", tmp / "o4"),
        "judge without responses": (["judge", tmp, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--betas", 1],
                                    "responses.jsonl not found", None),
        "judge nothing": (["judge", tmp, "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
                          "nothing to judge", None),
        "unknown experiment": (["experiment", "frontierr", "--out", tmp / "o6"], "unknown experiment 'frontierr'", tmp / "o6"),
        "unknown size": (["experiment", "scaling", "--size", "huge", "--out", tmp / "o6"],
                         "experiment scaling has no size 'huge': choose one of default, quick, large", tmp / "o6"),
        "a size another experiment lacks": (["experiment", "frontier", "--size", "large", "--out", tmp / "o6"],
                                            "experiment frontier has no size 'large': choose one of default, quick", tmp / "o6"),
        "quick and another size": (["experiment", "scaling", "--quick", "--size", "large", "--out", tmp / "o6"],
                                   "--quick is --size quick: leave out one of --quick and --size large", tmp / "o6"),
        "experiment into a file": (["experiment", "scaling", "--quick", "--out", tmp / "taken.jsonl"],
                                   "is a file: name a folder", None),
        "float16 training on CPU": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o8", "--backbone", tiny,
                                     "--device", "cpu", "--dtype", "float16"],
                                    "--dtype float16 (mixed precision) needs a CUDA device", tmp / "o8"),
        "unknown training dtype": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o8", "--dtype", "bf16"],
                                   "--dtype must be auto, float32, bfloat16 or float16, got 'bf16'", tmp / "o8"),
        "soft without a distributional head": (["generate", "--prompt", "hi", "--base-model", tiny, "--value", value_dir,
                                                "--soft"], "--soft needs a distributional value model", None),
        "unknown head": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o9", "--head", "max"],
                         "--head must be one of last, mean, distributional, next, got 'max'", tmp / "o9"),
        "distributional head with a discount": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o9",
                                                 "--head", "distributional", "--gamma", "0.9"],
                                                "--head distributional needs --gamma 1", tmp / "o9"),
        "bins for another head": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o9", "--bins", 11],
                                  "--bins is for --head distributional", tmp / "o9"),
        "too many layers": (["train", "--quiet", "--data", tmp / "good-data", "--out", tmp / "o7", "--backbone", tiny,
                             "--backbone-layers", 9], "keep 1 to 2 of them, got 9", tmp / "o7"),
    }


CASES = ["missing model", "invalid model", "empty prompts", "long prompt", "k zero", "k a word", "k all, last head", "k too big",
         "non-finite reward", "not a value model", "value backbone without API", "API extra not JSON", "missing columns", "negative limit", "output exists",
         "missing value model", "missing data", "non-finite beta", "unknown experiment", "unknown size", "a size another experiment lacks", "quick and another size", "experiment into a file", "float16 training on CPU", "unknown training dtype", "too many layers", "soft without a distributional head", "unknown head",
         "distributional head with a discount", "bins for another head", "judge without responses",
         "judge nothing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, tmp_path, tiny_model_dir, other_tokenizer_model_dir, value_dir):
    args, message, must_not_exist = make_cases(tmp_path, tiny_model_dir, other_tokenizer_model_dir, value_dir)[case]
    result = vas(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vas: error: ") and message in lines[0], result.stderr
    if must_not_exist is not None:
        assert not must_not_exist.exists()
        # a collect whose reward fails keeps what it sampled, to resume from; no other bad input leaves anything
        kept = must_not_exist.with_name(must_not_exist.name + ".partial")
        assert kept.exists() == (case == "non-finite reward")
    if case in ("output exists", "experiment into a file"):
        assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"


def test_generate_jsonl_output(tmp_path, tiny_model_dir, value_dir):
    result = vas("generate", "--prompt", "hello", "--prompt", "what a day", "--base-model", tiny_model_dir,
                 "--value", f"{value_dir}=0.5", "--beta", 2, "--max-new-tokens", 5, "--out", tmp_path / "g.jsonl")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["hello", "what a day"]
    assert all(1 <= r["tokens"] <= 5 and r["kl"] >= 0 for r in records)
    (tmp_path / "p.txt").write_text("first\nsecond\nthird\n")
    result = vas("generate", "--prompts", tmp_path / "p.txt", "--start", 1, "--limit", 1, "--base-model", tiny_model_dir,
                 "--max-new-tokens", 2, "--out", tmp_path / "s.jsonl")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in (tmp_path / "s.jsonl").read_text().splitlines()] == ["second"]
    (tmp_path / "p.jsonl").write_text('{"text": "from a field"}\n')
    result = vas("generate", "--quiet", "--prompts", tmp_path / "p.jsonl", "--field", "text", "--base-model", tiny_model_dir,
                 "--max-new-tokens", 2, "--out", tmp_path / "f.jsonl")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["prompt"] for line in (tmp_path / "f.jsonl").read_text().splitlines()] == ["from a field"]


def test_generate_with_a_value_model_of_another_tokenizer_goes_through_text(tmp_path, other_tokenizer_model_dir, value_dir):
    """The base model's vocabulary differs from the value model's: candidates are steered as text."""
    result = vas("generate", "--prompt", "zebra", "--base-model", other_tokenizer_model_dir, "--value", value_dir,
                 "--beta", 4, "--max-new-tokens", 4, "--quiet", "--out", tmp_path / "t.jsonl")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["prompt"] == "zebra" and 1 <= records[0]["tokens"] <= 4
    assert records[0]["kl"] > 0 and 0 <= records[0]["outside_mass"] <= 1


def test_experiment_all_quick_writes_every_section(tmp_path, tiny_model_dir):
    result = vas("experiment", "all", "--quick", "--quiet", "--base-model", tiny_model_dir, "--out", tmp_path / "x")
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "x" / "REPORT.md").read_text()
    from vas.experiments import ALL

    sections = ["frontier", "bon-cost", "judge", "beta-knob", "composition", "ablations-targets", "ablations-top-k", "ablations-data"]
    assert [report.index(f"<!-- section: {name} -->") for name in sections] == sorted(
        report.index(f"<!-- section: {name} -->") for name in sections)  # all there, in the order they ran
    for name in ALL:
        assert (tmp_path / "x" / name / "summary.json").is_file()
    assert "scaling" not in ALL and not (tmp_path / "x" / "scaling").exists()  # it runs on its own
    # at --quick size, every experiment shares one collection of π0 samples
    assert len(list((tmp_path / "x" / "stages").iterdir())) == 1


def test_policy_options_are_written_once_and_reach_the_command(monkeypatch):
    """collect, generate and evaluate all take PolicyConfig's fields as options, and a command receives them as
    one PolicyConfig."""
    import dataclasses

    import typer

    from vas import cli
    from vas.config import PolicyConfig

    command = typer.main.get_command(cli.app)
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    for name in ("collect", "generate", "evaluate"):
        params = {p.name: p for p in command.commands[name].params}
        assert fields <= set(params)
        assert params["base_model"].opts == ["--base-model", "-m"] and params["api_stop"].multiple
    received = {}

    def fake_run(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(cli, "build_policy", lambda config, *a, **k: received.setdefault("config", config) and fake_run())
    with pytest.raises(SystemExit):
        command.main(["generate", "--prompt", "hi", "-m", "some/model", "--api-stop", "a", "--api-stop", "b",
                      "--timeout", "5"], standalone_mode=False)
    assert received["config"] == PolicyConfig(base_model="some/model", api_stop=["a", "b"], timeout=5.0)


def test_train_a_distributional_head_and_generate_with_soft_values(tiny_model_dir, tmp_path):
    """`vas train --head distributional` stores the head; `vas generate --soft` then steers by the soft values,
    and its rows say so (a resumed run with another --soft is refused)."""
    from test_train import make_data

    make_data(load_tokenizer(tiny_model_dir), n_prompts=8).save_to_disk(str(tmp_path / "data"))
    r = vas("train", "--quiet", "--data", tmp_path / "data", "--out", tmp_path / "v", "--backbone", tiny_model_dir,
            "--head", "distributional", "--bins", 7, "--epochs", 1, "--val-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "v" / "vas_value_config.json").read_text())
    assert (config["head"], config["bins"], config["support"], config["point_value"]) == ("distributional", 7, [0.0, 1.0], True)
    # one epoch on 8 prompts leaves the histogram near its start, a point at the mean reward, whose trimmed soft
    # value is V̂ itself; random histogram rows give every candidate its own spread, as a trained head would
    head = load_file(tmp_path / "v" / "value_head.safetensors")
    head["weight"][:7] = torch.randn(7, head["weight"].shape[1], generator=torch.Generator().manual_seed(0))
    save_file(head, tmp_path / "v" / "value_head.safetensors")
    common = ["generate", "--quiet", "--prompt", "hi", "--prompt", "yo", "--base-model", tiny_model_dir, "--value",
              tmp_path / "v", "--beta", 8, "--max-new-tokens", 4, "-k", 5]
    soft = vas(*common, "--soft", "--out", tmp_path / "soft.jsonl")
    plain = vas(*common, "--out", tmp_path / "mean.jsonl")
    assert soft.returncode == 0 and plain.returncode == 0, soft.stderr + plain.stderr
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] for name in ("soft", "mean")}
    assert all(row["kl"] > 0 for name in rows for row in rows[name])
    # same seeds, a different guide: some step's distribution differs, so the KL does
    assert [row["kl"] for row in rows["soft"]] != [row["kl"] for row in rows["mean"]]


def test_train_a_next_head_and_generate_over_every_token(tiny_model_dir, tmp_path):
    """`vas train --head next` stores the head; `vas generate -k all` steers every token with it, and differs
    from k = 5 (same seeds: Eq. 5 then leaves the other tokens at β·mean V)."""
    from test_train import make_data

    make_data(load_tokenizer(tiny_model_dir), n_prompts=8).save_to_disk(str(tmp_path / "data"))
    r = vas("train", "--quiet", "--data", tmp_path / "data", "--out", tmp_path / "v", "--backbone", tiny_model_dir,
            "--head", "next", "--epochs", 1, "--val-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "v" / "vas_value_config.json").read_text())["head"] == "next"
    common = ["generate", "--quiet", "--prompt", "hi", "--prompt", "yo", "--base-model", tiny_model_dir, "--value",
              tmp_path / "v", "--beta", 50, "--max-new-tokens", 4]
    for k in ("all", "5"):
        result = vas(*common, "-k", k, "--out", tmp_path / f"{k}.jsonl")
        assert result.returncode == 0, result.stderr
    rows = {k: [json.loads(line) for line in (tmp_path / f"{k}.jsonl").read_text().splitlines()] for k in ("all", "5")}
    assert all(row["kl"] > 0 for k in rows for row in rows[k])
    assert [row["kl"] for row in rows["all"]] != [row["kl"] for row in rows["5"]]


def test_evaluate_runs_end_to_end(tiny_model_dir, value_dir, tmp_path):
    """`vas evaluate` on a local model: the report holds every condition, and the partial folder is gone."""
    r = vas("evaluate", "--quiet", "--base-model", tiny_model_dir, "--value", value_dir, "--out", tmp_path / "e",
            "--limit", 2, "--betas", "0,3", "--best-of", "1,2", "--max-new-tokens", 3, "-k", 4)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert [v["beta"] for v in report["vas"]] == [0.0, 3.0] and [b["n"] for b in report["best_of_n"]] == [1, 2]
    assert report["vas"][0]["kl"] == 0 and report["vas"][1]["kl"] > 0
    from vas.evaluate import summary_sentence

    assert summary_sentence(report) in r.stdout  # the one-sentence summary under the table
    assert not (tmp_path / "e.partial").exists()
    rows = [json.loads(line) for line in (tmp_path / "e" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 + 2 * 2  # a pool of 2 per prompt, then one response per prompt and β


def test_generate_at_huge_beta_has_a_finite_kl_and_warns(tmp_path, tiny_model_dir, value_dir):
    """β·ΔV beyond float32's range: every step puts all mass on the candidate with the largest V, so a row's KL is
    −Σ log π0 of its chosen tokens; the KL per token is extreme, which a warning says."""
    result = vas("generate", "--quiet", "--prompt", "hello", "--prompt", "what a day", "--base-model", tiny_model_dir,
                 "--value", value_dir, "--beta", "3e38", "--max-new-tokens", 6, "--out", tmp_path / "g.jsonl")
    assert result.returncode == 0, result.stderr
    for row in (json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()):
        assert row["kl"] == pytest.approx(-sum(row["logprobs"]), rel=1e-4)
    assert result.stderr.startswith("vas: warning: KL(π‖π0) is ") and "nats per token" in result.stderr


def test_generate_shows_tokens_as_they_are_generated(tmp_path, tiny_model_dir):
    """The progress bar counts tokens within a batch; its last count is every token of every response."""
    import re

    result = vas("generate", "--prompt", "hello", "--prompt", "what a day", "--base-model", tiny_model_dir,
                 "--max-new-tokens", 7, "--out", tmp_path / "g.jsonl")
    assert result.returncode == 0, result.stderr
    counts = [int(n) for n in re.findall(r"(\d+) tokens\]", result.stderr)]
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert counts and counts[-1] == sum(r["tokens"] for r in rows)


def test_interrupted_train_resumes_when_run_again(tmp_path, tiny_model_dir):
    """Ctrl-C during `vas train` says the same command resumes, and it does: the rerun starts from the newest
    checkpoint (at the step it names) and saves the value model."""
    import signal
    import time

    datasets.Dataset.from_dict({"prompt_ids": [[1, 2]] * 4, "response_ids": [[3, 4]] * 4, "reward": [0.0, 1.0, 0.0, 1.0],
                                "prompt_index": [0, 1, 2, 3]}).save_to_disk(str(tmp_path / "data"))
    args = ["train", "--quiet", "--data", tmp_path / "data", "--out", tmp_path / "v", "--backbone", tiny_model_dir,
            "--epochs", 300, "--save-steps", 5, "--val-fraction", 0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "vas", *map(str, args)], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "v.checkpoints").glob("checkpoint-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "vas: interrupted; the newest checkpoint is kept" in stderr and "run the same command again" in stderr
    assert not (tmp_path / "v").exists()
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "v.checkpoints").glob("checkpoint-*"))
    assert 5 <= newest < 300
    result = vas(*args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v" / "value_head.safetensors").is_file() and not (tmp_path / "v.checkpoints").exists()


def test_help_placeholders_and_version():
    """Every option's placeholder reads as a value (no Python type such as <list[str]>); --version prints the
    installed version."""
    from importlib.metadata import version

    import typer

    from vas import cli

    command = typer.main.get_command(cli.app)
    for name, sub in command.commands.items():
        text = sub.get_help(sub.make_context(name, [], resilient_parsing=True))
        assert "list[" not in text, name
    generate = command.commands["generate"]
    help_text = generate.get_help(generate.make_context("generate", [], resilient_parsing=True))
    assert "--value PATH[=WEIGHT]" in help_text and "--prompt TEXT" in help_text and "--api-stop TEXT" in help_text
    result = vas("--version")
    assert result.returncode == 0 and result.stdout == f"vas {version('value-augmented-sampling')}\n"


def test_readme_commands_parse():
    """Each `vas …` line of README's "Using it" block is accepted by the command as written (options and values
    parse; nothing runs), so that the README cannot name a removed or misspelt option."""
    import re
    import shlex
    from pathlib import Path

    import typer

    from vas import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Using it\n\n```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line for line in block.splitlines() if line.startswith("vas ")]
    assert [shlex.split(line)[1] for line in lines] == ["collect", "train", "generate", "evaluate", "experiment", "judge"]
    command = typer.main.get_command(cli.app)
    for line in lines:
        name, *args = shlex.split(line)[1:]
        command.commands[name].make_context(name, args)  # raises on an unknown option or a bad value


@pytest.mark.parametrize("argv, hint", [
    (["generate", "--prompt", "hi"], "nothing is kept without --out"),
    (["generate", "--prompt", "hi", "--out=g.jsonl"], "finished work is kept, run the same command again to resume"),
    (["judge", "runs/eval", "--betas", "2"], "the verdicts are written at the end: nothing is kept"),
    (["collect", "--out", "runs/samples"], "finished work is kept, run the same command again to resume"),
])
def test_interrupt_hint_says_what_is_kept(monkeypatch, argv, hint):
    from vas import cli

    monkeypatch.setattr(sys, "argv", ["vas", *argv])
    assert cli._interrupt_hint() == hint
