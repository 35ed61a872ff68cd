"""The demo: collect → train → evaluate on the embedded model, task "positivity of replies to chitchat
openings", sized for under 20 minutes on 2 CPU cores (``vas demo``).

Training prompts and held-out prompts are disjoint slices of the chitchat openings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vas.pipeline import Recipe, claim, samples_and_value_model

DEMO_REWARD = "positivity"
DEMO_PROMPTS = "chitchat"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage of the demo is. The value model is built on the first ``value_depth`` of π0's layers
    (rounded; ``recipe.backbone_layers`` if set instead): a quarter-depth value model explains the reward as well
    as a full-depth one on this task and trains and steers at about a quarter of the cost, which buys four
    responses per prompt within the demo's time (README, "The demo's recipe")."""

    train_prompts: int = 320
    eval_prompts: int = 48
    recipe: Recipe = Recipe(samples_per_prompt=4)
    value_depth: float | None = 0.25
    betas: tuple[float, ...] = (2.0, 5.0, 10.0)
    top_k: int = 10
    best_of: tuple[int, ...] = (1, 2, 4, 8)


def run_demo(out: str | Path, *, base_model: str, size: DemoSize = DemoSize(), device: str = "auto",
             seed: int = 0, progress: bool = True, log=print) -> dict:
    """Run the three stages into ``out/`` (``samples/``, ``value/``, ``eval/``), reusing finished stages made
    with the same settings (``out/settings.json``).

    Returns:
        The evaluation report (see :func:`vas.evaluate.evaluate`).

    Raises:
        VasError: if ``out`` holds a demo made with other settings (:func:`vas.pipeline.claim`).
    """
    from vas.config import EvaluateConfig
    from vas.evaluate import evaluate
    from vas.models import (
        load_policy,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        resolve_value_dtype,
    )
    from vas.policy.local import LocalPolicy
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.value.model import ValueModel

    out = Path(out)
    claim(out, size, seed=seed, base_model=base_model)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(base_model)
    policy = load_policy(base_model, device=dev, dtype=resolve_dtype("auto", dev))
    recipe = size.recipe
    if recipe.backbone_layers is None and size.value_depth is not None:
        recipe = replace(recipe, backbone_layers=max(1, round(size.value_depth * policy.config.num_hidden_layers)))
    _, value_dir = samples_and_value_model(
        out, policy=policy, tokenizer=tokenizer, base_model=base_model,
        prompts=load_prompts(DEMO_PROMPTS, limit=size.train_prompts), reward_spec=DEMO_REWARD, recipe=recipe,
        seed=seed, device=dev, progress=progress, log=log, metadata={"prompts": DEMO_PROMPTS},
    )
    value_model = ValueModel.from_pretrained(value_dir, device=dev, dtype=resolve_value_dtype("auto", dev))

    eval_dir = out / "eval"
    log(f"evaluating on {size.eval_prompts} held-out prompts → {eval_dir}")
    held_out = load_prompts(DEMO_PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    return evaluate(LocalPolicy(policy, tokenizer), held_out, load_reward(DEMO_REWARD), [value_model], eval_dir,
                    EvaluateConfig(betas=size.betas, top_k=size.top_k, best_of=size.best_of,
                                   max_new_tokens=recipe.max_new_tokens, batch_size=recipe.batch_size, seed=seed),
                    progress=progress,
                    metadata={"task": "demo", "reward": DEMO_REWARD, "base_model": base_model, "size": asdict(size)})
