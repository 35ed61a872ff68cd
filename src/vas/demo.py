"""The demo: collect → train → evaluate on the embedded model, task "positivity of replies to chitchat
openings", sized for about 15 minutes on 2 CPU cores (``vas demo``).

Training prompts and held-out prompts are disjoint slices of the chitchat openings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_REWARD = "positivity"
DEMO_PROMPTS = "chitchat"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage of the demo is."""

    train_prompts: int = 256
    samples_per_prompt: int = 2
    eval_prompts: int = 48
    max_new_tokens: int = 40
    epochs: float = 2.0
    learning_rate: float = 1e-3
    lora_rank: int = 16
    betas: tuple[float, ...] = (2.0, 5.0, 10.0)
    top_k: int = 10
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    batch_size: int = 16


def run_demo(out: str | Path, *, base_model: str, size: DemoSize = DemoSize(), device: str = "auto",
             seed: int = 0, progress: bool = True, log=print) -> dict:
    """Run the three stages into ``out/`` (``samples/``, ``value/``, ``eval/``), reusing finished stages.

    Returns:
        The evaluation report (see :func:`vas.evaluate.evaluate`).
    """
    from vas.collect import COLUMNS, collect
    from vas.evaluate import evaluate
    from vas.models import load_policy, load_tokenizer, resolve_device, resolve_dtype, resolve_value_dtype
    from vas.prompts import load_prompts
    from vas.rewards import load_reward
    from vas.storage import load_dataset_dir
    from vas.train import train_value_model
    from vas.value import ValueModel

    out = Path(out)
    dev = resolve_device(device)
    dtype = resolve_dtype("auto", dev)
    tokenizer = load_tokenizer(base_model)
    policy = load_policy(base_model, device=dev, dtype=dtype)
    reward = load_reward(DEMO_REWARD)
    samples_dir, value_dir, eval_dir = out / "samples", out / "value", out / "eval"

    if samples_dir.exists():
        log(f"[1/3] samples: reusing {samples_dir}")
        data = load_dataset_dir(samples_dir, set(COLUMNS))
    else:
        log(f"[1/3] collecting {size.train_prompts}×{size.samples_per_prompt} responses from π0 → {samples_dir}")
        data = collect(policy, tokenizer, load_prompts(DEMO_PROMPTS, limit=size.train_prompts), reward, samples_dir,
                       samples_per_prompt=size.samples_per_prompt, max_new_tokens=size.max_new_tokens,
                       batch_size=size.batch_size, seed=seed, progress=progress,
                       metadata={"base_model": base_model, "reward": DEMO_REWARD, "prompts": DEMO_PROMPTS})

    if value_dir.exists():
        log(f"[2/3] value model: reusing {value_dir}")
    else:
        log(f"[2/3] training the value model (TD(λ), λ=0.95) → {value_dir}")
        metrics = train_value_model(data, value_dir, backbone=base_model, pad_token_id=tokenizer.pad_token_id,
                                    tokenizer=tokenizer, epochs=size.epochs, learning_rate=size.learning_rate,
                                    lora_rank=size.lora_rank, lora_alpha=size.lora_rank, batch_size=size.batch_size,
                                    seed=seed, device=dev, progress=progress,
                                    metadata={"reward": DEMO_REWARD, "base_model": base_model})
        log(f"      validation MSE (TD(λ) targets) {metrics.get('eval_loss', float('nan')):.4f}, "
            f"(reward labels) {metrics.get('eval_mc_mse', float('nan')):.4f}")
    value_model = ValueModel.from_pretrained(value_dir, device=dev, dtype=resolve_value_dtype("auto", dev))

    log(f"[3/3] evaluating on {size.eval_prompts} held-out prompts → {eval_dir}")
    held_out = load_prompts(DEMO_PROMPTS, start=size.train_prompts, limit=size.eval_prompts)
    return evaluate(policy, tokenizer, held_out, reward, [value_model], eval_dir, betas=size.betas, top_k=size.top_k,
                    best_of=size.best_of, max_new_tokens=size.max_new_tokens, batch_size=size.batch_size, seed=seed,
                    progress=progress, metadata={"task": "demo", "reward": DEMO_REWARD, "base_model": base_model,
                                                 "size": asdict(size)})
