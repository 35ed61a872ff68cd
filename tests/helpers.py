"""Builders shared by the tests: tiny value models with non-trivial (random) LoRA and head weights."""

from __future__ import annotations

import torch

from vas.value.model import ValueModel


def random_value_model(model_dir: str, seed: int = 0, lora_rank: int = 4, num_layers: int | None = None,
                       **head) -> ValueModel:
    """A value model on ``model_dir`` whose LoRA and head are random, so its values depend on the text; ``head``
    passes ``head``, ``mean_over``, ``bins`` and ``support`` to :meth:`ValueModel.create`."""
    torch.manual_seed(seed)
    model = ValueModel.create(model_dir, lora_rank=lora_rank, init_value=0.1, num_layers=num_layers, **head)
    with torch.no_grad():
        for weight in ((model.head.baseline.weight, model.head.mix.weight) if model.kind == "next" else (model.head.weight,)):
            torch.nn.init.normal_(weight, std=1.0)
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
    return model.eval()


def tokens(ids, mask):
    """What a token-level scorer reads from a rollout: the tokens appended since the last step."""
    from types import SimpleNamespace

    from vas.policy.local import Appended

    return SimpleNamespace(appended=Appended(ids, mask))


SERVED_HEADS = {"a": {"head": "last"}, "b": {"head": "mean"},
                "c": {"head": "distributional", "bins": 11, "support": (-1.0, 1.0)}, "d": {"head": "next"}}
"""The value models :func:`served_value_models` serves: one of each head."""


def served_value_models(model_dir: str, folder, monkeypatch) -> None:
    """Save a random value model of each head in :data:`SERVED_HEADS` under ``folder`` and set the vLLM
    processor's settings (k = 4, float32, recorded statistics) in the environment."""
    from vas.serving.processor import SETTINGS_ENV, Settings

    for seed, (name, head) in enumerate(SERVED_HEADS.items(), start=1):
        random_value_model(model_dir, seed=seed, **head).save_pretrained(folder / name)
    settings = Settings({name: str(folder / name) for name in SERVED_HEADS}, vocab_size=300, top_k=4, dtype="float32",
                        record=True)
    monkeypatch.setenv(SETTINGS_ENV, settings.to_env())


def expected(models, logits, prompt, output, beta, weights, top_k, temperature, soft=False):
    """Eq. 5 by hand for one served request: full forwards of each value model over prompt + output + candidate
    (the mean head's window from the prompt's last token, the distributional head's soft value at β·w with
    ``soft``); τ·log π returned, as the vLLM processor returns it."""
    base = torch.log_softmax(logits / temperature, dim=-1)
    candidates = base.topk(top_k).indices
    with torch.no_grad():
        ids = torch.tensor([prompt + output + [int(c)] for c in candidates])
        lengths = torch.full((len(ids),), len(prompt))
        values = sum(w * m(ids, torch.ones_like(ids), prompt_lengths=lengths, beta=beta * w if soft else None)[:, -1]
                     for w, m in zip(weights, models))
    steered = base.clone()
    steered[candidates] += beta * (values - values.mean())
    return temperature * torch.log_softmax(steered, dim=-1)
