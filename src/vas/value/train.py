"""Train: regress the value model V on TD(λ) targets of π0's own returns (paper Eq. 3, App. C.1, Table 4).

Training runs in Hugging Face's :class:`transformers.Trainer`, so checkpoints (``--save-steps``), resuming,
bf16/fp16 and multi-GPU via ``accelerate launch`` behave as Hugging Face users expect. Only the LoRA adapter and
the head are trained and checkpointed. An interrupted run resumes from its newest checkpoint when it is started
again with the same settings and data. On a CPU a seed gives the same value model bit for bit (same machine,
torch version and thread count); CUDA kernels may add run-to-run differences of rounding size.

Each training row is ``prompt_ids ⊕ response_ids``; its states are s_0 (the prompt) … s_T (the whole
response, EOS included when generated), read at positions L−1 … L−1+T of one forward pass. Every state is
regressed, the finished state s_T onto the reward itself (its value, see :mod:`vas.value.td`), so V(s ⊕ EOS) —
asked for at decoding whenever EOS is among the top-k — is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Sequence

import datasets
import torch
from tqdm.auto import tqdm
from transformers import (
    PreTrainedTokenizerBase,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from vas.config import TrainConfig
from vas.errors import VasError
from vas.models import resolve_dtype
from vas.storage import make_temp_dir, require_absent, write_json_atomic
from vas.value.heads import two_hot
from vas.value.td import lambda_returns
from vas.value.model import ValueModel

WEAK_VALUE_MODEL = 0.1
"""A value model that explains less than this share of the validation reward variance is called weak."""


class ValueCollator:
    """Rows {prompt_ids, response_ids, reward} → a right-padded batch.

    Output tensors: ``input_ids`` (B, S) int64, ``attention_mask`` (B, S), ``state_index`` (B, T_max+1)
    int64 positions of s_0 … s_T, ``state_mask`` (B, T_max+1) bool, ``reward`` (B,) float32,
    ``prompt_length`` (B,) int64.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in rows]
        width = max(len(s) for s in seqs)
        states = max(len(r["response_ids"]) for r in rows) + 1
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, width), dtype=torch.long)
        state_index = torch.zeros((B, states), dtype=torch.long)
        state_mask = torch.zeros((B, states), dtype=torch.bool)
        for b, (row, seq) in enumerate(zip(rows, seqs)):
            input_ids[b, : len(seq)] = torch.tensor(seq)
            attention_mask[b, : len(seq)] = 1
            L, T = len(row["prompt_ids"]), len(row["response_ids"])
            state_index[b, : T + 1] = torch.arange(L - 1, L + T)
            state_mask[b, : T + 1] = True
        reward = torch.tensor([float(r["reward"]) for r in rows], dtype=torch.float32)
        prompt_length = torch.tensor([len(r["prompt_ids"]) for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "state_index": state_index,
                "state_mask": state_mask, "reward": reward, "prompt_length": prompt_length}


def state_outputs(model: ValueModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's outputs at s_t for t = 0 … T_max: (B, T_max+1, 1, bins or bins + 1) float32 (garbage where
    ``state_mask`` is False)."""
    outputs = model(batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_length"], head_outputs=True)
    index = batch["state_index"][..., None].expand(-1, -1, outputs.shape[-1])
    return outputs.gather(1, index)


def regressed_states(kind: str, state_mask: torch.Tensor) -> torch.Tensor:
    """The states a head of this ``kind`` is regressed and validated on, (B, T_max+1) bool: every real state, or
    for the ``next`` head every state reached by a response token (not s_0, which no token of the row leads to:
    Q(s_t, x_{t+1}) is trained on the λ-return of s_{t+1}, so only tokens taken in the response are regressed)."""
    if kind != "next":
        return state_mask
    regressed = state_mask.clone()
    regressed[:, 0] = False
    return regressed


def state_values(model: ValueModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """V(s_t) for t = 0 … T_max: (B, T_max+1) float32 (the distributional head's point value V̂)."""
    return model.values(state_outputs(model, batch))


class ValueTrainer(Trainer):
    """Trainer with the TD(λ) value loss, value-specific validation metrics and adapter-only checkpoints."""

    def __init__(self, *args, lam: float = 0.95, gamma: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam, self.gamma = lam, gamma

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """MSE between V(s_t) and the λ-returns G_t (computed from the same, detached, values). The ``next``
        head's V(s_t) is Q(s_{t-1}, x_t), and s_0 is left out (:func:`regressed_states`).

        A distributional head (:mod:`vas.value.heads`) learns its point value V̂ like the ``last`` head and its
        histogram by cross-entropy to the distributional λ-return (the same recursion over histograms) whose
        finished state's return is :func:`vas.value.heads.two_hot` (V̂(s_T)), detached: the histogram spreads over
        where π0's continuations lead, not over V̂'s error. Its loss is the sum of the two, per state."""
        unwrapped = self.accelerator.unwrap_model(model)
        outputs = state_outputs(model, inputs)
        mask = inputs["state_mask"]
        regressed = regressed_states(unwrapped.kind, mask)
        if unwrapped.kind == "distributional":
            log_probs = torch.log_softmax(unwrapped.histogram_logits(outputs).float(), dim=-1)
            point = unwrapped.point_values(outputs)  # V̂(s_t), (B, T_max+1)
            point_targets = lambda_returns(point.detach(), inputs["reward"], mask, lam=self.lam, gamma=self.gamma)
            last = (mask.sum(dim=1) - 1)[:, None]
            finished = two_hot(point.gather(1, last).squeeze(1).detach(), unwrapped.support.to(log_probs.device))
            targets = lambda_returns(log_probs.detach().exp(), finished, mask, lam=self.lam, gamma=self.gamma)
            loss = (-(targets * log_probs).sum(dim=-1) + (point - point_targets) ** 2)[regressed].mean()
            values = unwrapped.values(outputs)
        else:
            values = outputs[..., 0]
            targets = lambda_returns(values.detach(), inputs["reward"], mask, lam=self.lam, gamma=self.gamma)
            loss = ((values - targets) ** 2)[regressed].mean()
        return (loss, {"values": values}) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation metrics, averaged over all states of all validation responses (for the ``next`` head, all
        but s_0: :func:`regressed_states`):

        * ``<prefix>_loss``: MSE to the TD(λ) targets (what training minimises; for a distributional head, of its
          point value V̂, the part of its loss besides the histogram's cross-entropy);
        * ``<prefix>_mc_mse``: MSE to the response's reward (Monte-Carlo label, independent of the model);
        * ``<prefix>_final_mse``: MSE of V(s_T) to the reward (the finished state, whose value is the reward);
        * ``<prefix>_reward_var``: the variance of the reward over the same states, i.e. the ``mc_mse`` of the best
          constant prediction: the baseline a useful value model beats;
        * ``<prefix>_explained``: 1 − mc_mse / reward_var, the share of that variance the value model explains (≤ 0:
          no better than a constant; even a perfect V^π0 stays below 1 where a state's reward is still uncertain).
        """
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "mc_mse": 0.0, "final_mse": 0.0, "reward": 0.0, "reward_sq": 0.0}
        states = responses = 0
        for batch in loader:
            batch = self._prepare_inputs(batch)
            values = state_values(model, batch)
            states_mask, reward = batch["state_mask"], batch["reward"]
            targets = lambda_returns(values, reward, states_mask, lam=self.lam, gamma=self.gamma)
            mask = regressed_states(self.accelerator.unwrap_model(model).kind, states_mask)
            last = states_mask.sum(dim=1) - 1
            sums["loss"] += float(((values - targets) ** 2)[mask].sum())
            sums["mc_mse"] += float(((values - reward[:, None]) ** 2)[mask].sum())
            sums["final_mse"] += float(((values.gather(1, last[:, None]).squeeze(1) - reward) ** 2).sum())
            weight = mask.sum(dim=1).to(reward.dtype)  # each response's reward counts once per state
            sums["reward"] += float((weight * reward).sum())
            sums["reward_sq"] += float((weight * reward**2).sum())
            states += int(mask.sum())
            responses += len(reward)
        model.train(was_training)
        n = max(states, 1)
        reward_var = max(sums["reward_sq"] / n - (sums["reward"] / n) ** 2, 0.0)
        metrics = {
            f"{metric_key_prefix}_loss": sums["loss"] / n,
            f"{metric_key_prefix}_mc_mse": sums["mc_mse"] / n,
            f"{metric_key_prefix}_final_mse": sums["final_mse"] / max(responses, 1),
            f"{metric_key_prefix}_reward_var": reward_var,
            f"{metric_key_prefix}_explained": 1 - sums["mc_mse"] / n / reward_var if reward_var > 0 else 0.0,
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Only the adapter and the head change: save those (a few MB), not the frozen backbone.
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        (model or self.model).load_trainable(resume_from_checkpoint)


def describe_evaluation(metrics: dict[str, float], epoch: float) -> str:
    """One readable line for one validation (:meth:`ValueTrainer.evaluate`'s metrics): the MSE to the rewards next
    to their variance (the MSE of predicting their mean) and the share explained, then the MSE to the TD(λ)
    targets and at the finished states; a weak value model (:data:`WEAK_VALUE_MODEL`) is called so."""
    line = (f"epoch {epoch:.2f}: validation MSE to the rewards {metrics['eval_mc_mse']:.4f}, against their variance "
            f"{metrics['eval_reward_var']:.4f}: {metrics['eval_explained']:.0%} explained (MSE to the TD(λ) targets "
            f"{metrics['eval_loss']:.4f}, at finished responses {metrics['eval_final_mse']:.4f})")
    if metrics["eval_explained"] < 0:
        line += ("; a weak value model, worse than predicting the mean reward: VAS will steer by noise "
                 "(more data or epochs may help)")
    elif metrics["eval_explained"] < WEAK_VALUE_MODEL:
        line += ("; a weak value model, barely better than predicting the mean reward: VAS will steer little "
                 "(more data or epochs may help)")
    return line


class TrainingProgress(TrainerCallback):
    """In place of the Trainer's own progress and log printing: a bar labelled ``desc`` over the training steps
    with the training loss, and :func:`describe_evaluation`'s line for each validation, through ``log``."""

    def __init__(self, log: Callable[[str], None] | None, progress: bool, desc: str = "training the value model"):
        self.log, self.progress, self.desc, self.bar, self.step = log, progress, desc, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", disable=not self.progress)
        self.step = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.step)
        self.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix_str(f"loss {logs['loss']:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.log is not None and metrics:
            with tqdm.external_write_mode():
                self.log(describe_evaluation(metrics, state.epoch or 0.0))

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


class Elapsed(TrainerCallback):
    """Keeps a training's wall seconds in ``path`` (in its checkpoint folder) at every save, so that a resumed
    run counts the time the interrupted one spent up to its last checkpoint."""

    def __init__(self, path: Path):
        self.path = path
        self.before = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_save(self, args, state, control, **kwargs):
        write_json_atomic(self.path, {"seconds": self.seconds})


def show_progress(trainer, checkpoint_dir: Path, log: Callable[[str], None] | None, progress: bool, desc: str) -> Elapsed:
    """Replace the Trainer's printing (raw log dicts) by :class:`TrainingProgress` and start an :class:`Elapsed`
    clock kept in ``checkpoint_dir``; returns the clock."""
    for printer in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(printer)
    trainer.add_callback(TrainingProgress(log, progress, desc))
    elapsed = Elapsed(Path(checkpoint_dir) / "vas_elapsed.json")
    trainer.add_callback(elapsed)
    return elapsed


def data_digest(data: datasets.Dataset) -> str:
    """A short hash of the training rows (token ids and rewards): a resumed run must train on the same data."""
    rows = [list(data[column]) for column in ("prompt_ids", "response_ids", "reward")]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def split_by_prompt(data: datasets.Dataset, val_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train/validation split that keeps all samples of one prompt on the same side (no prompt leaks).

    Raises:
        VasError: if there are too few prompts to hold out any.
    """
    key = "prompt_index" if "prompt_index" in data.column_names else None
    groups = sorted(set(data[key])) if key else list(range(len(data)))
    if not 0 <= val_fraction < 1:
        raise VasError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    n_val = max(1, math.floor(len(groups) * val_fraction)) if val_fraction > 0 else 0
    if n_val >= len(groups):
        raise VasError(f"cannot hold out {val_fraction:.0%} of {len(groups)} prompts for validation: collect more "
                       "prompts or pass --val-fraction 0")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    val_groups = {groups[i] for i in order[:n_val]}
    ids = data[key] if key else groups
    train_idx = [i for i, g in enumerate(ids) if g not in val_groups]
    val_idx = [i for i, g in enumerate(ids) if g in val_groups]
    return data.select(train_idx), data.select(val_idx)


def _initial_value_model(config: TrainConfig, train_rewards: torch.Tensor, device: torch.device | str) -> ValueModel:
    """The untrained value model of ``config`` on ``device``: its head starts at the training rewards' mean
    (``train_rewards``, (N,) float32) and a distributional head's support spans their range (±0.5 around a
    single reward). Seeds the global generators with ``config.seed`` first: the LoRA initialisation draws from
    them (the Trainer seeds the rest)."""
    set_seed(config.seed)
    low, high = float(train_rewards.min()), float(train_rewards.max())
    if high - low < 1e-6:  # one reward only: any range around it
        low, high = low - 0.5, high + 0.5
    return ValueModel.create(
        config.backbone, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
        init_value=float(train_rewards.mean()), num_layers=config.backbone_layers, head=config.head,
        mean_over=config.mean_over, bins=config.bins, support=(low, high), device=device,
    )


def _training_arguments(config: TrainConfig, checkpoint_dir: Path, compute_dtype: torch.dtype, device: torch.device,
                       *, progress: bool, train_rows: int, validate: bool) -> TrainingArguments:
    """The Trainer's settings for ``config``: checkpoints in ``checkpoint_dir`` (every ``config.save_steps`` steps,
    else every epoch, the newest two kept), validation every epoch where ``validate``, about five loss logs per
    epoch of ``train_rows`` rows, mixed precision in ``compute_dtype`` (bfloat16 or float16; float32: none)."""
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        eval_strategy="epoch" if validate else "no",
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        logging_steps=max(1, train_rows // config.batch_size // 5),
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def backbone_for(config: TrainConfig, data_settings: dict) -> tuple[TrainConfig, PreTrainedTokenizerBase]:
    """``config`` with its backbone defaulting to the data's base model (``data_settings``: the collection's
    settings, :func:`vas.collect.load_collected`), and the backbone's tokenizer, checked to be the base model's:
    the collected token columns are π0's.

    Raises:
        VasError: if neither ``config`` nor the data names a backbone, or the backbone's tokenizer differs from
            the data's base model's.
    """
    from vas.models import load_tokenizer
    from vas.value.model import check_same_tokenizer

    base_model = data_settings.get("base_model")
    config = dataclasses.replace(config, backbone=config.backbone or base_model)
    if config.backbone is None:
        raise VasError("the dataset does not name its base model: pass --backbone")
    tokenizer = load_tokenizer(config.backbone)
    if base_model and config.backbone != base_model:
        check_same_tokenizer(load_tokenizer(base_model), tokenizer, config.backbone)
    return config, tokenizer


def train_value_model(
    data: datasets.Dataset,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    metadata: dict | None = None,
    callbacks: list | None = None,
) -> dict:
    """Train a value model on collected data with TD(λ) targets (Eq. 3) and save it to ``out_dir``
    (``ValueModel.from_pretrained``), with ``tokenizer``.

    Args:
        data: rows with ``prompt_ids``, ``response_ids`` and ``reward`` (output of :func:`vas.collect.collect`),
            tokenized by ``tokenizer``.
        config: the backbone (required here), λ, γ, the optimiser, LoRA and the split (:class:`vas.config.TrainConfig`).
        progress: show a progress bar over the training steps.
        log: receives one line per validation (:func:`describe_evaluation`); None: nothing is printed.
        metadata: JSON-able fields stored in the value model's config (base model, reward …).
        callbacks: extra :class:`transformers.TrainerCallback` objects (early stopping, logging …).

    Checkpoints go to ``<out_dir>.checkpoints`` every ``config.save_steps`` steps, or once per epoch, and are
    removed once the value model is saved. If that folder exists, the same call (same ``config`` and data)
    continues from its newest checkpoint.

    Returns:
        Metrics dict: ``train_loss``, the final ``eval_*`` values (:meth:`ValueTrainer.evaluate`) and ``history``
        (one entry per evaluation).

    Raises:
        VasError: for a setting out of range, no backbone, a non-finite reward, too little data to split, or
            ``<out_dir>.checkpoints`` holding an interrupted run with other settings or data.
    """
    config.check()
    if config.backbone is None:
        raise VasError("no value backbone: set TrainConfig.backbone (--backbone)")
    lam, gamma, seed = config.lam, config.gamma, config.seed
    compute_dtype = resolve_dtype(config.dtype, torch.device(device))
    if compute_dtype == torch.float16 and torch.device(device).type != "cuda":
        raise VasError("--dtype float16 (mixed precision) needs a CUDA device: use bfloat16 or float32")
    rewards = torch.tensor(data["reward"], dtype=torch.float32)
    if not bool(torch.isfinite(rewards).all()):
        raise VasError("the dataset has non-finite rewards: fix the reward function and collect again")
    train_set, val_set = split_by_prompt(data, config.val_fraction, seed)
    model = _initial_value_model(config, torch.tensor(train_set["reward"], dtype=torch.float32), device)
    out_dir = Path(out_dir)
    require_absent(out_dir)
    checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoints")
    from vas.resume import trainer_checkpoint

    # before the Trainer, which creates its output folder
    resume = trainer_checkpoint(checkpoint_dir, {"config": dataclasses.asdict(config), "data": data_digest(data)})
    args = _training_arguments(config, checkpoint_dir, compute_dtype, torch.device(device), progress=progress,
                              train_rows=len(train_set), validate=len(val_set) > 0)
    trainer = ValueTrainer(
        model=model, args=args, train_dataset=train_set, eval_dataset=val_set if len(val_set) else None,
        data_collator=ValueCollator(tokenizer.pad_token_id), lam=lam, gamma=gamma, callbacks=callbacks,
    )
    elapsed = show_progress(trainer, checkpoint_dir, log, progress, "training the value model")
    result = trainer.train(resume_from_checkpoint=resume)
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    metrics = {"train_loss": result.training_loss, "train_seconds": elapsed.seconds, "history": history,
               **({k: v for k, v in history[-1].items() if k.startswith("eval_")} if history else {})}
    tmp = make_temp_dir(out_dir)
    model.save_pretrained(
        tmp, tokenizer=tokenizer, lam=lam, gamma=gamma, train_rows=len(train_set), val_rows=len(val_set),
        metrics={k: v for k, v in metrics.items() if k != "history"}, **(metadata or {}),
    )
    tmp.rename(out_dir)  # the value model appears whole, or not at all
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics
