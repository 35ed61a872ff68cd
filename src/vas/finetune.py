"""Fine-tuned baselines: π0 fine-tuned with LoRA through TRL into a policy π_θ, the methods the paper compares
VAS with (Sec. 5, Fig. 2/3, Table 1), trained on the same data as the value model.

* **DPO** (offline, as in the paper): preference pairs from the collected π0 samples, per prompt its
  highest-reward response against its lowest (:func:`preference_pairs`); TRL's ``DPOTrainer``. Its β (here
  ``kl_coef``) sets the trade-off: DPO's optimum is π0·exp(r/β)/Z, the KL-regularised optimum.
* **Online RL with a KL penalty against π0**: TRL's ``RLOOTrainer`` (the reward of each sampled response minus
  β·Σ_t log π_θ/π0, a leave-one-out baseline over the responses to the same prompt) or ``GRPOTrainer`` (KL in the
  loss), sampling responses to the data's prompts and scoring them with the reward function. PPO is not offered
  (:class:`vas.config.FinetuneConfig`).

The result is a PEFT adapter folder with ``vas_finetune.json``: the method, settings, base model, reward and the
training cost (wall seconds, and the π0 samples read or π_θ samples drawn). :func:`load_finetuned` loads it for
:func:`vas.evaluate.evaluate`, which samples π_θ and measures its exact KL against π0.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from vas.config import FinetuneConfig
from vas.errors import VasError
from vas.storage import make_temp_dir, require_absent, write_json_atomic

META = "vas_finetune.json"


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> str:
    """The prompt as π0 read it, as text TRL tokenizes back into the same ids: special tokens kept, except a
    leading BOS that the tokenizer adds again by itself."""
    text = tokenizer.decode(list(prompt_ids))
    bos = tokenizer.bos_token
    if bos and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id] and text.startswith(bos):
        text = text[len(bos):]
    return text


def response_text(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], response_ids: list[int]) -> str:
    """A response's text as it continues its prompt (decoded together, so that a tokenizer that drops a word's
    leading space at the start of a text keeps it), special tokens kept."""
    prompt = tokenizer.decode(list(prompt_ids))
    whole = tokenizer.decode(list(prompt_ids) + list(response_ids))
    return whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(list(response_ids))


def preference_pairs(data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """DPO's preference pairs from collected π0 samples (:func:`vas.collect.collect`): for each prompt, the
    response with the highest reward (chosen) against the one with the lowest (rejected). Among tied rewards the
    first sampled is taken. A prompt whose responses all have the same reward gives no pair.

    Args:
        data: rows with ``prompt_ids``, ``response_ids``, ``reward`` and ``prompt_index`` (else rows are grouped
            by ``prompt_ids``), several per prompt.
        tokenizer: the tokenizer of the ids.

    Returns:
        One row per prompt with a preference, in prompt order: ``prompt`` (the prompt as π0 read it, chat
        template included, special tokens kept), ``chosen`` and ``rejected`` (the responses' text, their EOS
        included where it was generated), ``chosen_reward``, ``rejected_reward``, ``prompt_index``.
    """
    keys = data["prompt_index"] if "prompt_index" in data.column_names else [tuple(p) for p in data["prompt_ids"]]
    groups: dict = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    rewards = data["reward"]
    columns = {name: [] for name in ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "prompt_index")}
    for index, (key, rows) in enumerate(groups.items()):
        best = max(rows, key=lambda r: rewards[r])  # max/min keep the first of tied rows
        worst = min(rows, key=lambda r: rewards[r])
        if rewards[best] == rewards[worst]:
            continue
        prompt_ids = data[best]["prompt_ids"]
        columns["prompt"].append(prompt_text(tokenizer, prompt_ids))
        columns["chosen"].append(response_text(tokenizer, prompt_ids, data[best]["response_ids"]))
        columns["rejected"].append(response_text(tokenizer, prompt_ids, data[worst]["response_ids"]))
        columns["chosen_reward"].append(float(rewards[best]))
        columns["rejected_reward"].append(float(rewards[worst]))
        columns["prompt_index"].append(key if isinstance(key, int) else index)
    return datasets.Dataset.from_dict(columns)


def _online_prompts(data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """The data's distinct prompts, in order: ``prompt`` as π0 reads it (chat template included) and
    ``user_prompt`` as the reward reads it."""
    seen: dict = {}
    for text, ids in zip(data["prompt"], data["prompt_ids"]):
        seen.setdefault(tuple(ids), text)
    return datasets.Dataset.from_dict({"prompt": [prompt_text(tokenizer, list(ids)) for ids in seen],
                                       "user_prompt": list(seen.values())})


def collected_for_finetuning(data: str | Path, config: FinetuneConfig,
                             reward: str | None = None) -> tuple[datasets.Dataset, dict, str | None]:
    """The π0 samples in the folder ``data`` (:func:`vas.collect.load_collected`), their collection settings
    (which name π0, ``base_model``) and the reward spec ``config.method`` optimises: ``reward`` for the online
    methods (default: the data's, checked by loading it), the data's for DPO.

    Raises:
        VasError: if the data lacks its columns or does not name its base model, was collected through an API
            (its token columns are the value model's), ``reward`` is given for DPO, or an online method has no
            reward spec or a bad one.
    """
    from vas.collect import REQUIRED_FOR_TRAINING, load_collected

    dataset, meta = load_collected(data, REQUIRED_FOR_TRAINING | {"prompt"})
    if not meta.get("base_model"):
        raise VasError(f"{data} does not name its base model (no vas_collect.json): collect it with vas collect")
    if meta.get("api_base_url"):
        raise VasError(f"{data} was collected through an API: its token columns are the value model's, not π0's, and π0 "
                       "is not here to fine-tune")
    if reward and config.method == "dpo":
        raise VasError("--reward is for the online methods: DPO trains on the data's own rewards")
    reward_spec = reward or meta.get("reward")
    if config.method != "dpo":
        from vas.rewards import load_reward

        if not reward_spec:
            raise VasError(f"--method {config.method} samples and scores new responses: pass --reward (the data names none)")
        load_reward(reward_spec)  # a bad spec fails before any model loads
    return dataset, meta, reward_spec


def finetune(
    data: datasets.Dataset,
    out_dir: str | Path,
    config: FinetuneConfig,
    *,
    base_model: str,
    reward_spec: str | None,
    data_settings: dict,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fine-tune π0 (``base_model``) with LoRA on ``data`` by ``config.method`` and save the adapter to ``out_dir``.

    Args:
        data: collected π0 samples (:func:`vas.collect.collect`): DPO trains on their pairs
            (:func:`preference_pairs`); the online methods sample new responses to their prompts.
        config: the method and its settings.
        base_model: π0, which the data was collected from.
        reward_spec: the reward the online methods optimise (:func:`vas.rewards.load_reward`); the data's own
            rewards are DPO's.
        data_settings: the data's collection settings (``vas_collect.json``): ``temperature``, ``max_new_tokens``,
            the online defaults.
        progress: show a progress bar over the training steps.

    Checkpoints go to ``<out_dir>.checkpoints`` (every ``config.save_steps`` steps, else every epoch); the same
    call resumes from the newest (:func:`vas.resume.trainer_checkpoint`).

    Returns:
        The adapter's ``vas_finetune.json``: ``method``, ``kl_coef``, ``base_model``, ``reward``, ``config``,
        ``training`` (``seconds``: wall time, resumed runs included up to their last checkpoint; ``steps``;
        ``pairs`` (DPO); ``samples_read``: π0 samples the method read (DPO: 2 per pair); ``samples_drawn``:
        responses π_θ sampled (online)) and ``train_loss``.

    Raises:
        VasError: for a setting out of range, ``out_dir`` existing, no pair (every prompt's responses tie), fewer
            than 2 samples per prompt online, a batch size that is not a multiple of them, or an interrupted
            run with other settings.
    """
    from vas.resume import trainer_checkpoint
    from vas.models import load_policy, load_tokenizer
    from vas.value.train import data_digest, show_progress

    config.check()
    out_dir = Path(out_dir)
    require_absent(out_dir)
    if len(data) == 0:
        raise VasError("the data holds no responses: collect some first (vas collect)")
    device = torch.device(device)
    tokenizer = load_tokenizer(base_model)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoints")
    if config.method == "dpo":
        train_set, training = _dpo_pairs(data, tokenizer)
    else:
        config = _online_config(config, data, data_settings)
        train_set, training = _online_prompts(data, tokenizer), {"samples_read": 0}
    reward_function = None if config.method == "dpo" else _reward_function(reward_spec)
    # before the trainer, which creates its output folder
    resume = trainer_checkpoint(checkpoint_dir, {"config": dataclasses.asdict(config), "base_model": base_model,
                                                 "reward": reward_spec, "data": data_digest(data)})
    model = load_policy(base_model, device=device, dtype=torch.float32)
    trainer = _trainer(config, model, tokenizer, train_set, reward_function, checkpoint_dir, device, progress)
    elapsed = show_progress(trainer, checkpoint_dir, None, progress, f"fine-tuning π0 ({config.method.upper()})")

    def info_at(steps: int, snapshot: bool = False) -> dict:  # an adapter's vas_finetune.json after ``steps`` steps
        return {"method": config.method, "snapshot": snapshot, "kl_coef": config.kl_coef, "base_model": base_model,
                "reward": reward_spec, "config": dataclasses.asdict(config),
                "training": {"seconds": elapsed.seconds, "steps": steps, **training,
                             "samples_drawn": 0 if config.method == "dpo" else steps * config.batch_size}}

    snapshots = checkpoint_dir / "snapshots"
    trainer.add_callback(_Snapshots(snapshots, config.snapshots, lambda model, steps: _save(
        model, tokenizer, info_at(steps, snapshot=True), snapshots / f"step-{steps}")))
    result = trainer.train(resume_from_checkpoint=resume)
    steps = trainer.state.global_step
    info = {**info_at(steps), "train_loss": result.training_loss}
    _publish(trainer.model, tokenizer, info, out_dir, checkpoint_dir)
    if log is not None:
        log(f"{label(info)}: {steps} steps in {elapsed.seconds / 60:.1f} min")
    return info


def _dpo_pairs(data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, dict]:
    """DPO's training set (the ``prompt``, ``chosen`` and ``rejected`` columns of :func:`preference_pairs`) and
    its part of the training cost: ``pairs`` and ``samples_read`` (2 per pair).

    Raises:
        VasError: if there is no pair (every prompt's responses tie).
    """
    pairs = preference_pairs(data, tokenizer)
    if len(pairs) == 0:
        raise VasError("no preference pair: every prompt's responses have the same reward (DPO needs a better "
                       "and a worse response to one prompt; collect more --samples-per-prompt)")
    return pairs.select_columns(["prompt", "chosen", "rejected"]), {"pairs": len(pairs), "samples_read": 2 * len(pairs)}


def _online_config(config: FinetuneConfig, data: datasets.Dataset, data_settings: dict) -> FinetuneConfig:
    """``config`` with the settings an online method uses where the data gives the default: the responses per
    prompt (the data's fewest, unless set), ``max_new_tokens`` and ``temperature`` (the collection's: the policy
    is trained, and its KL measured, at its τ).

    Raises:
        VasError: for fewer than 2 responses per prompt, or a batch size that is not a multiple of them.
    """
    counts: dict = {}
    for key in (data["prompt_index"] if "prompt_index" in data.column_names else map(tuple, data["prompt_ids"])):
        counts[key] = counts.get(key, 0) + 1
    group = config.samples_per_prompt or min(counts.values())
    if group < 2:
        raise VasError(f"--method {config.method} compares ≥ 2 responses per prompt: pass --samples-per-prompt 2 "
                       f"or more (got {group})")
    if config.batch_size % group:
        raise VasError(f"--batch-size ({config.batch_size}) must be a multiple of the responses per prompt ({group})")
    return dataclasses.replace(config, samples_per_prompt=group,
                               max_new_tokens=config.max_new_tokens or data_settings.get("max_new_tokens", 64),
                               temperature=config.temperature or data_settings.get("temperature", 0.7))


def _reward_function(reward_spec: str | None) -> Callable:
    """The reward (:func:`vas.rewards.load_reward`) as TRL's online trainers call it: the rewards of a batch's
    completions to its ``user_prompt`` column, as a list of floats; named ``reward_spec`` in TRL's logs."""
    from vas.rewards import load_reward, score

    reward = load_reward(reward_spec)

    def reward_function(prompts, completions, user_prompt, **_):
        return score(reward, list(user_prompt), list(completions)).tolist()

    reward_function.__name__ = str(reward_spec)
    return reward_function


def _trainer(config: FinetuneConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             train_set: datasets.Dataset, reward_function: Callable | None, checkpoint_dir: Path,
             device: torch.device, progress: bool):
    """TRL's trainer of ``config.method`` (``DPOTrainer``, ``RLOOTrainer`` or ``GRPOTrainer``) for a LoRA adapter
    on every linear layer of ``model``, checkpointing to ``checkpoint_dir``; the online ones score their samples
    with ``reward_function``."""
    from peft import LoraConfig

    from vas.models import resolve_dtype

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=str(checkpoint_dir), num_train_epochs=config.epochs, learning_rate=config.learning_rate,
                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=config.seed,
                  save_strategy="steps" if config.save_steps else "epoch", save_steps=config.save_steps or 500,
                  save_total_limit=2, logging_steps=1, report_to=[], disable_tqdm=not progress,
                  use_cpu=device.type == "cpu", bf16=resolve_dtype("auto", device) == torch.bfloat16,
                  dataloader_num_workers=0)
    if config.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, beta=config.kl_coef, per_device_train_batch_size=config.batch_size, max_length=None)
        return DPOTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer, peft_config=lora)
    online = dict(per_device_train_batch_size=config.batch_size, num_generations=config.samples_per_prompt,
                  max_completion_length=config.max_new_tokens, temperature=config.temperature,
                  beta=config.kl_coef, disable_dropout=True)
    if config.method == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    return Trainer(model=model, reward_funcs=reward_function, args=Config(**common, **online),
                   train_dataset=train_set, processing_class=tokenizer, peft_config=lora)


def _publish(model, tokenizer: PreTrainedTokenizerBase, info: dict, out_dir: Path, checkpoint_dir: Path) -> None:
    """Save the trained adapter to ``out_dir`` whole or not at all, with the snapshots taken during training (if
    any), and remove the checkpoints."""
    tmp = make_temp_dir(out_dir)
    _save(model, tokenizer, info, tmp)
    snapshots = checkpoint_dir / "snapshots"
    if snapshots.is_dir():
        snapshots.rename(tmp / "snapshots")
    tmp.rename(out_dir)  # the adapter appears whole, or not at all
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _save(model, tokenizer: PreTrainedTokenizerBase, info: dict, directory: Path) -> None:
    """Write the adapter, its tokenizer and ``info`` to ``directory`` (atomically where it does not exist yet)."""
    target = directory
    if not directory.exists():
        directory = make_temp_dir(target)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_json_atomic(directory / META, info)
    if directory != target:
        directory.rename(target)


class _Snapshots(TrainerCallback):
    """Saves the adapter at ``count − 1`` evenly spaced steps before the last (``save(model, steps)``); a
    resumed run keeps those it has."""

    def __init__(self, directory: Path, count: int, save: Callable):
        self.directory, self.count, self.save, self.steps = directory, count, save, set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = {round(state.max_steps * i / self.count) for i in range(1, self.count)} - {0, state.max_steps}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and not (self.directory / f"step-{state.global_step}").exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self.save(model, state.global_step)


def label(info: dict) -> str:
    """A fine-tuned policy's name in reports, by its method and KL coefficient (DPO's β is one), e.g.
    ``DPO KL 0.1`` or, for a snapshot taken during training, ``RLOO KL 0.05, step 16``."""
    name = f"{info['method'].upper()} KL {info['kl_coef']:g}"
    return name + (f", step {info['training']['steps']}" if info.get("snapshot") else "")


@dataclass
class Finetuned:
    """A fine-tuned policy π_θ to evaluate: its adapter, loaded onto π0 only when :meth:`load` is called (one
    at a time: each is a full copy of π0).

    Attributes:
        path: its adapter folder.
        info: its ``vas_finetune.json`` (:func:`finetune`'s result).
        device, dtype: where and in which dtype :meth:`load` puts it.
    """

    path: Path
    info: dict
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return label(self.info)

    def load(self) -> PreTrainedModel:
        """π0 with the LoRA adapter merged: the same network as π0, so it decodes at π0's cost."""
        from peft import PeftModel

        from vas.models import load_policy

        base = load_policy(self.info["base_model"], device=self.device, dtype=self.dtype)
        return PeftModel.from_pretrained(base, str(self.path)).merge_and_unload().eval()


def read_finetune_info(path: str | Path, base_model: str | None = None) -> dict:
    """The ``vas_finetune.json`` of an adapter folder, checked against π0 = ``base_model`` where given.

    Raises:
        VasError: if ``path`` is not a folder written by :func:`finetune`, lacks its adapter's files, or was
            fine-tuned from another base model than ``base_model``.
    """
    meta = Path(path) / META
    if not meta.is_file():
        raise VasError(f"{path} is not a fine-tuned policy (no {META}): make one with vas finetune")
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (Path(path) / f).is_file()]
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        info = None
    if missing or not isinstance(info, dict) or not {"method", "kl_coef", "base_model", "training"} <= set(info):
        raise VasError(f"{path} is a damaged fine-tuned policy ({', '.join(missing) + ' missing' if missing else META + ' unreadable'}): "
                       "fine-tune it again")
    if base_model is not None and info["base_model"] != base_model:
        raise VasError(f"{path} was fine-tuned from {info['base_model']}, not from π0 = {base_model} (--base-model)")
    return info


def load_finetuned(path: str | Path, *, base_model: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> Finetuned:
    """The fine-tuned policy at ``path``, checked against π0 (its weights load later, :meth:`Finetuned.load`).

    Raises:
        VasError: if ``path`` is not an adapter written by :func:`finetune`, or was fine-tuned from another base
            model than ``base_model``.
    """
    return Finetuned(Path(path), read_finetune_info(path, base_model), device, dtype)
