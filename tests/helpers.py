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
        torch.nn.init.normal_(model.head.weight, std=1.0)
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
    return model.eval()


def tokens(ids, mask):
    """What a token-level scorer reads from a rollout: the tokens appended since the last step."""
    from types import SimpleNamespace

    from vas.policy.local import Appended

    return SimpleNamespace(appended=Appended(ids, mask))
