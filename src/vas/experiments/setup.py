"""What every experiment starts from: π0 loaded once, and the collect → train stages kept under
``OUT/stages/`` so that experiments asking for the same samples or value model share them.

A stage's folder name spells out the settings that made it, plus a short hash of the full recipe, so a
change of any setting (or a ``--quick`` run) gets its own stage folder instead of reusing the wrong one.
An experiment's own folder (``OUT/NAME``, with its cached decoding results) records the settings it was
made with in ``settings.json``; running it again with other settings is refused rather than mixing results.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vas.pipeline import Recipe, claim, collected_samples, rescored, trained_value_model


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def recipe_fields(recipe: Recipe) -> dict:
    """The recipe's settings that shape its value model: a head's settings only where they apply, so that a
    ``last``-head value model keeps the stage name it had before heads were a setting."""
    fields = asdict(recipe)
    if recipe.head == "distributional":  # trained with a point value since (vas.value.heads): older stages not reused
        fields["point_value"] = True
    else:
        del fields["bins"]
    if recipe.head != "mean":
        del fields["mean_over"]
    if recipe.head == "last":
        del fields["head"]
    return fields


@dataclass
class Setup:
    """One experiment run's models and settings.

    Attributes:
        out: the experiment's own folder (``OUT/NAME``); shared stages live in ``out.parent / "stages"``.
        policy, tokenizer: π0 (float32 on CPU, ``--dtype auto`` elsewhere) and its tokenizer.
        value_dtype: dtype value models are loaded in for decoding (``auto``: bf16 where native).
    """

    out: Path
    base_model: str
    device: torch.device
    seed: int
    progress: bool
    log: Callable[[str], None]
    policy: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    value_dtype: torch.dtype

    @classmethod
    def load(cls, out: Path, *, base_model: str, device: torch.device, seed: int, progress: bool,
             log: Callable[[str], None], size) -> Setup:
        """Load π0 and claim ``out`` for an experiment of this ``size`` (a dataclass), seed and base model.

        Raises:
            VasError: if ``out`` holds results made with other settings.
        """
        from vas.models import (
            load_policy,
            load_tokenizer,
            resolve_dtype,
            resolve_value_dtype,
        )

        claim(out, size, seed=seed, base_model=base_model)
        tokenizer = load_tokenizer(base_model)
        policy = load_policy(base_model, device=device, dtype=resolve_dtype("auto", device))
        return cls(out=Path(out), base_model=base_model, device=device, seed=seed, progress=progress, log=log,
                   policy=policy, tokenizer=tokenizer, value_dtype=resolve_value_dtype("auto", device))

    @property
    def stages(self) -> Path:
        return self.out.parent / "stages"

    def samples(self, prompts: str, count: int, recipe: Recipe, reward: str, *, start: int = 0,
                engine: str = "transformers", batch_size: int | None = None) -> tuple[datasets.Dataset, Path]:
        """π0's responses to ``count`` prompts of source ``prompts`` from the ``start``-th on, scored by
        ``reward``, and the stage folder they are kept in (pass it to :meth:`value_model`). ``engine``:
        ``transformers`` samples with the loaded π0, ``vllm`` in a ``vllm.LLM`` engine (π0 in the loaded π0's dtype)
        started for the collection and shut down after it (:class:`vas.serving.engine.VllmPolicy`; ``vas collect --engine vllm``).
        ``batch_size``: responses per collection batch (default: ``recipe.batch_size``)."""
        from vas.policy.local import LocalPolicy
        from vas.prompts import load_prompts

        first = f"from{start}-" if start else ""
        dtype = str(self.policy.dtype).removeprefix("torch.")  # vLLM runs π0 in the loaded π0's dtype, not its own
        sampler = "" if engine == "transformers" else f"{engine}-{dtype}-"
        name = (f"{prompts}-{first}{count}x{recipe.samples_per_prompt}-{recipe.max_new_tokens}tok-{sampler}"
                f"seed{self.seed}-"
                f"{_digest(self.base_model, recipe.samples_per_prompt, recipe.max_new_tokens, batch_size or recipe.batch_size)}")
        stage = self.stages / name
        if (stage / "samples").exists() or engine == "transformers":
            policy = LocalPolicy(self.policy, self.tokenizer)
        else:
            from vas.serving.engine import VllmPolicy

            policy = VllmPolicy(self.base_model, dtype=dtype)
        try:
            data = collected_samples(
                stage / "samples", policy=policy, prompts=load_prompts(prompts, start=start, limit=count),
                reward_spec=reward, recipe=recipe, batch_size=batch_size, seed=self.seed, progress=self.progress,
                log=self.log, metadata={"base_model": self.base_model, "prompts": prompts,
                                        **({"start": start} if start else {}), **({"engine": engine} if sampler else {})})
        finally:
            if not isinstance(policy, LocalPolicy):
                policy.shutdown()
        return data, stage

    def value_model(self, stage: Path, data: datasets.Dataset, reward: str, recipe: Recipe, *,
                    prompts: int | None = None) -> Path:
        """A value model for ``reward`` (the responses re-scored by it) trained with ``recipe`` on ``data``
        from :meth:`samples`, restricted to its first ``prompts`` prompts if given; kept in ``stage``.
        Returns its folder. ``recipe.backbone_layers`` is capped at π0's depth."""
        depth = self.policy.config.num_hidden_layers
        if recipe.backbone_layers and recipe.backbone_layers > depth:
            recipe = replace(recipe, backbone_layers=depth)
        if prompts is not None:
            data = data.filter(lambda index: index < prompts, input_columns="prompt_index")
        layers = f"L{recipe.backbone_layers}" if recipe.backbone_layers else "Lall"
        head = "" if recipe.head == "last" else f"-{recipe.head}"
        name = (f"value-{reward}{head}-lam{recipe.lam:g}-{layers}-{len(data)}rows-seed{self.seed}-"
                f"{_digest(recipe_fields(recipe), reward, len(data))}")
        directory = stage / name
        return trained_value_model(directory, data if directory.exists() else rescored(data, reward), tokenizer=self.tokenizer, base_model=self.base_model,
                                   recipe=recipe, seed=self.seed, device=self.device, progress=self.progress,
                                   log=self.log, metadata={"reward": reward})

    def finetuned(self, stage: Path, data: datasets.Dataset, config, reward: str) -> Path:
        """π0 fine-tuned by ``config`` (:class:`vas.config.FinetuneConfig`) on ``data`` from :meth:`samples` (whose
        rewards are ``reward``'s), kept in ``stage`` beside the value models trained on the same samples, or reused
        from there. Returns the adapter's folder (:func:`vas.finetune.load_finetuned`)."""
        from vas.finetune import finetune

        name = (f"finetuned-{config.method}-kl{config.kl_coef:g}-{len(data)}rows-seed{self.seed}-"
                f"{_digest(asdict(config), reward, len(data))}")
        directory = stage / name
        if directory.exists():
            self.log(f"fine-tuned policy: reusing {directory}")
            return directory
        self.log(f"fine-tuning π0 by {config.method.upper()} (KL coefficient {config.kl_coef:g}) on {len(data)} responses "
                 f"→ {directory}")
        settings = json.loads((stage / "samples" / "vas_collect.json").read_text())
        finetune(rescored(data, reward), directory, config, base_model=self.base_model, reward_spec=reward,
                 data_settings=settings, device=self.device, progress=self.progress, log=self.log)
        return directory

    def load_value_model(self, directory: Path):
        from vas.value.model import ValueModel

        return ValueModel.from_pretrained(directory, device=self.device, dtype=self.value_dtype)


    def responses(self, cache: Path, prompts: list[str], steering, rewards: dict[str, Callable], *,
                  samples_per_prompt: int, max_new_tokens: int, batch_size: int, desc: str) -> dict:
        """``samples_per_prompt`` responses per prompt from π0 (``steering`` None) or VAS, scored by each of
        ``rewards``; kept in the JSON file ``cache`` and reused from it when it exists (an interrupted
        experiment resumes at the first condition it had not finished).

        Returns:
            ``{"texts": [P·m], "kl": [P], "tokens": [P], "seconds_per_response": float, NAME: [P] for each
            reward}``: per-prompt means over the m samples. Every condition draws with the same seeds (see
            :func:`vas.decoding.batches.generate`), so differences between conditions are paired.
        """
        import json

        from vas.decoding.batches import generate
        from vas.policy.local import LocalPolicy
        from vas.rewards import score
        from vas.storage import write_json_atomic

        if cache.is_file():
            return json.loads(cache.read_text())
        m, P = samples_per_prompt, len(prompts)
        rows = generate(LocalPolicy(self.policy, self.tokenizer), [p for p in prompts for _ in range(m)], steering,
                        temperature=0.7, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=self.seed,
                        progress=self.progress, desc=desc)
        texts = [r["response"] for r in rows]
        kl, tokens = torch.tensor([r["kl"] for r in rows]), torch.tensor([float(r["tokens"]) for r in rows])
        result = {"texts": texts, "kl": kl.view(P, m).mean(dim=1).tolist(),
                  "tokens": tokens.view(P, m).mean(dim=1).tolist(),
                  "seconds_per_response": sum(r["seconds"] for r in rows) / (P * m)}
        repeated = [p for p in prompts for _ in range(m)]
        for name, reward in rewards.items():
            result[name] = score(reward, repeated, texts).view(P, m).mean(dim=1).tolist()
        write_json_atomic(cache, result)
        return result
