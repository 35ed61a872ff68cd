"""The value model V^{π0}: a causal-LM backbone + LoRA + a head (:mod:`vas.value.heads`) on the hidden states.

Paper: Sec. 3.3 and App. C.1 (backbone with a linear head, LoRA-trained, Table 4). One forward pass over
``prompt ⊕ response`` gives V(s_t) for every state: from the hidden state at the last token of s_t (``last``),
the running mean of the hidden states (``mean``), or a histogram of the return (``distributional``).

Decoding scores the k candidates of each row with it through :mod:`vas.value.scorers`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from vas.config import HEADS, MEAN_OVER, TrainConfig
from vas.errors import VasError
from vas.value.heads import RunningMean, atoms, make_head, soft_excess, soft_value, two_hot
from vas.models import cache_kwargs, load_backbone, load_tokenizer, position_ids_from_mask

CONFIG_NAME = "vas_value_config.json"
HEAD_NAME = "value_head.safetensors"


class ValueModel(nn.Module):
    """V(s): backbone (+ LoRA) → hidden states (B, S, H) → head (:mod:`vas.value.heads`) → (B, S) float32 values.

    The head is ``last`` (a linear map of the state's last hidden state, Sec. 3.3), ``mean`` (of the running
    mean of the hidden states from the prompt's last token, or from the first with ``mean_over="all"``) or ``distributional`` (a point value V̂
    beside a histogram over the reward's range, read as V̂ or as the soft value at β); it is stored in the config (``value_config["head"]``).
    Build a fresh one with :meth:`create`, reload a trained one with :meth:`from_pretrained`. It carries its
    tokenizer (``tokenizer``), which decides whether it reads π0's token ids or text while decoding, and
    the folder it was loaded from (``name_or_path``, None for a new one), by which an engine that loads
    value models itself (:mod:`vas.serving.engine`) finds it.
    """

    def __init__(self, backbone: PreTrainedModel, head: nn.Module, config: dict,
                 tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.value_config = config
        self.tokenizer = tokenizer
        self.name_or_path: str | None = None  # the folder it was loaded from (from_pretrained)
        self.kind: str = config.get("head", "last")
        self.mean_over: str = config.get("mean_over", "response")
        self.support = (atoms(*config["support"], config["bins"], device=self.device)
                        if self.kind == "distributional" else None)

    @classmethod
    def create(
        cls,
        backbone: str,
        *,
        lora_rank: int = 32,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        init_value: float = 0.0,
        num_layers: int | None = None,
        head: str = TrainConfig.head,
        mean_over: str = TrainConfig.mean_over,
        bins: int = TrainConfig.bins,
        support: tuple[float, float] = (0.0, 1.0),
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ValueModel":
        """A new value model on the causal LM ``backbone`` (spec as in :func:`vas.models.resolve_model`).

        The backbone is frozen and wrapped with LoRA on all its linear layers (Table 4: rank 32, α 32);
        the head is zero-initialised, with bias ``init_value`` (the training data's mean reward is a good
        start), so every V(s) starts at ``init_value``; a distributional head over ``bins`` atoms spanning
        ``support`` (low, high) starts with V̂ = ``init_value`` and its histogram at :func:`two_hot` (``init_value``)
        (99 % of the mass, the rest spread evenly), where its targets start. ``mean_over`` is the mean head's window: ``response`` (from
        the prompt's last token) or ``all`` (the prompt too). ``num_layers`` keeps only the backbone's first L
        layers (:func:`vas.models.load_backbone`), a cheaper value model for decoding.

        Raises:
            VasError: for an unknown head or window, fewer than 2 bins, or a support with low ≥ high.
        """
        if head not in HEADS:
            raise VasError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
        if mean_over not in MEAN_OVER:
            raise VasError(f"--mean-over must be one of {', '.join(MEAN_OVER)}, got {mean_over!r}")
        if head == "distributional" and (bins < 2 or not support[0] < support[1]):
            raise VasError(f"a distributional head needs --bins ≥ 2 and a reward range low < high, got {bins} bins "
                           f"over {tuple(support)}")
        body = load_backbone(backbone, device=device, dtype=dtype, num_layers=num_layers)
        body.requires_grad_(False)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear")
        body = get_peft_model(body, lora)
        linear = make_head(head, body.config.hidden_size, body.get_input_embeddings(), bins=bins, device=device)
        bias = linear.baseline.bias if head == "next" else linear.bias
        nn.init.constant_(bias, init_value)  # V, or the distributional head's V̂
        if head == "distributional":
            start = 0.99 * two_hot(torch.tensor([float(init_value)]), atoms(*support, bins))[0] + 0.01 / bins
            with torch.no_grad():
                bias[:bins].copy_(start.log())
        if Path(backbone).expanduser().exists():  # a local directory: store it absolute, to reload from anywhere
            backbone = str(Path(backbone).expanduser().resolve())
        config = {"backbone": backbone, "num_layers": body.config.num_hidden_layers, "lora_rank": lora_rank,
                  "lora_alpha": lora_alpha, "head": head}
        if head == "mean":
            config["mean_over"] = mean_over
        if head == "distributional":
            config.update(bins=bins, support=[float(support[0]), float(support[1])], point_value=True)
        return cls(body, linear, config, load_tokenizer(backbone))

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The backbone's dtype (the head stays float32)."""
        return self.backbone.dtype

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """The backbone's last hidden states.

        Args:
            input_ids: (B, S) int64.
            attention_mask: (B, S) {0,1} padding mask (positions derived from it when ``position_ids`` is
                None), or a ready (B, 1, S, S_past + S) additive float mask (then pass ``position_ids``).
            position_ids: (B, S) int64 or None.
            cache: the backbone's KV cache of earlier tokens, updated in place, or None.

        Returns:
            (B, S, H) float32.
        """
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **(cache_kwargs(self.backbone, cache) if cache is not None else {"use_cache": False}),
        )
        return out.last_hidden_state.float()

    def window_start(self, prompt_lengths: torch.Tensor) -> torch.Tensor:
        """The mean head's first pooled position per row, (B,) int64, from each prompt's length in tokens."""
        return (prompt_lengths - 1).clamp_min(0) if self.mean_over == "response" else torch.zeros_like(prompt_lengths)

    def outputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's outputs at every position of whole sequences: (B, S, 1) values, or (B, S, bins + 1) logits and V̂ of
        the distributional head. Each position's output is for the state that ends there; for the ``next`` head it
        is Q(s, x) of the previous position's state s and this position's token x, which is V of the state ending
        here (position 0 has no previous state: its entry is the baseline w·h_0 + b, the value of no state).

        Args:
            input_ids: (B, S) int64.
            attention_mask: (B, S) {0,1} padding mask.
            prompt_lengths: (B,) int64 prompt tokens of each row: the mean head's window starts at the prompt's
                last token (``mean_over="response"``). None: the whole sequence is the prompt's last token on,
                i.e. the window is every token.
        """
        hidden = self.hidden_states(input_ids, attention_mask)
        if self.kind == "next":
            following = self.head(hidden[:, :-1], input_ids[:, 1:, None])  # (B, S-1, 1): Q(s_p, x_{p+1})
            return torch.cat([self.head.baseline(hidden[:, :1]), following], dim=1)
        if self.kind == "mean":
            positions = position_ids_from_mask(attention_mask)
            start = (self.window_start(prompt_lengths.to(positions.device)) if prompt_lengths is not None
                     else torch.zeros(len(positions), dtype=torch.long, device=positions.device))
            joins = attention_mask.bool() & (positions >= start[:, None])
            hidden = RunningMean().extend(hidden, joins)
        return self.head(hidden)

    def values(self, outputs: torch.Tensor, beta: torch.Tensor | float | None = None) -> torch.Tensor:
        """The values of head outputs (…, 1, bins or bins + 1) → (…) float32: the value; for the distributional head
        (``beta`` a float or a tensor broadcastable to ``outputs.shape[:-1]``):

        * its point value V̂ (``beta`` None), or for a model saved before V̂ its histogram's mean;
        * its soft value at ``beta``: that value plus the histogram's :func:`vas.value.heads.soft_excess`, the soft
          value of the histogram trimmed of :data:`vas.value.heads.TAIL` at each end less its mean. The histogram gives the spread, V̂ the
          location; the soft value tends to V̂ as β → 0 and to V̂ plus the distance from the trimmed mean to the
          histogram's 1 − TAIL quantile as β → ∞.

        The other heads predict one value, whose soft value is itself."""
        if self.kind != "distributional":
            return outputs[..., 0]
        log_probs = torch.log_softmax(self.histogram_logits(outputs).float(), dim=-1)
        support = self.support.to(outputs.device)
        point = (soft_value(log_probs, support, None) if outputs.shape[-1] == len(self.support)  # saved before V̂
                 else self.point_values(outputs))
        return point if beta is None else point + soft_excess(log_probs, support, beta)

    def histogram_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """The distributional head's histogram logits among its outputs: (…, bins [+ 1]) → (…, bins)."""
        return outputs[..., : len(self.support)]

    def point_values(self, outputs: torch.Tensor) -> torch.Tensor:
        """The distributional head's point value V̂ (:mod:`vas.value.heads`): (…, bins + 1) → (…) float32.

        Raises:
            VasError: if the head has no point value (a distributional value model saved by an older vas).
        """
        if outputs.shape[-1] != len(self.support) + 1:
            raise VasError("this distributional value model has no point value: it was trained by an older vas; "
                           "train it again")
        return outputs[..., -1].float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        prompt_lengths: torch.Tensor | None = None,
        beta: torch.Tensor | float | None = None,
        head_outputs: bool = False,
    ) -> torch.Tensor:
        """V at every position of whole sequences (:meth:`outputs`, then :meth:`values`).

        Returns:
            (B, S) float32: V of the state ending at each position (soft at ``beta`` for a distributional head);
            with ``head_outputs``, the head's outputs (B, S, 1, bins or bins + 1) instead (training reads them through
            ``forward``, so that a wrapped model, e.g. for distributed training, is called as a module).
        """
        outputs = self.outputs(input_ids, attention_mask, prompt_lengths=prompt_lengths)
        return outputs if head_outputs else self.values(outputs, beta)

    def save_pretrained(self, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, **extra) -> None:
        """Write the LoRA adapter, the head, the tokenizer (``tokenizer``, else the model's own) and
        ``vas_value_config.json`` (plus ``extra`` fields) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, directory / HEAD_NAME)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / CONFIG_NAME).write_text(json.dumps({**self.value_config, **extra}, indent=2))

    def load_trainable(self, directory: str | Path) -> None:
        """Load LoRA and head weights saved by :meth:`save_pretrained` into this (unmerged) model, in place."""
        from peft import set_peft_model_state_dict

        directory = Path(directory)
        set_peft_model_state_dict(self.backbone, load_file(directory / "adapter_model.safetensors", device=str(self.device)))
        self.head.load_state_dict(load_file(directory / HEAD_NAME, device=str(self.device)))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        trainable: bool = False,
    ) -> "ValueModel":
        """Load a value model saved by :meth:`save_pretrained`, with its tokenizer.

        With ``trainable=False`` (decoding) the LoRA weights are merged into the backbone for speed and
        the model is put in eval mode with gradients off.

        Raises:
            VasError: if ``directory`` does not exist or is not a saved value model.
        """
        directory = Path(directory)
        check_value_dir(directory)
        config_path = directory / CONFIG_NAME
        config = json.loads(config_path.read_text())
        if config.get("head", "last") not in HEADS:
            raise VasError(f"unknown value head {config['head']!r} in {str(config_path)!r}: one of {', '.join(HEADS)}")
        body = load_backbone(config["backbone"], device=device, dtype=dtype, num_layers=config.get("num_layers"))
        body = PeftModel.from_pretrained(body, directory, is_trainable=trainable)
        if not trainable:
            body = body.merge_and_unload()
        head = make_head(config.get("head", "last"), body.config.hidden_size, body.get_input_embeddings(),
                         bins=config.get("bins", 1), point_value=config.get("point_value", False), device=device)
        head.load_state_dict(load_file(directory / HEAD_NAME, device=str(device)))
        model = cls(body, head, config, load_value_tokenizer(directory))
        model.name_or_path = str(directory.resolve())
        if not trainable:
            model.eval().requires_grad_(False)
        return model


def check_value_dir(directory: str | Path) -> None:
    """Raise :class:`VasError` unless ``directory`` is a saved value model (checked before anything loads)."""
    directory = Path(directory)
    if not directory.exists():
        hint = ""
        name, sep, rest = str(directory).partition("=")
        if sep and Path(rest).exists():
            hint = f" (this command takes PATH or PATH=WEIGHT; NAME=DIR is `vas serve`'s form: give {rest})"
        raise VasError(f"value model {str(directory)!r} does not exist{hint}")
    if not (directory / CONFIG_NAME).is_file():
        raise VasError(f"{str(directory)!r} is not a value model folder (no {CONFIG_NAME}; `vas train` makes one)")


def value_head(directory: str | Path) -> str:
    """The head (:data:`vas.config.HEADS`) of the value model saved in ``directory``, read from its config
    without loading it (:func:`check_value_dir` first)."""
    return json.loads((Path(directory) / CONFIG_NAME).read_text()).get("head", "last")


def value_summary(directory: str | Path) -> dict:
    """What a saved value model is, from its config, without its path: ``head``, ``reward`` (the reward spec it
    was trained on), ``train_rows`` and ``val_rows`` (responses in its training and validation sets) and
    ``validation_r2`` (the share of the validation rewards' variance it explains, 1 − MSE / Var; App. C.1).
    Fields its config lacks (a value model saved by hand) are None."""
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    return {"head": config.get("head", "last"), "reward": config.get("reward"), "train_rows": config.get("train_rows"),
            "val_rows": config.get("val_rows"), "validation_r2": config.get("metrics", {}).get("eval_explained")}


def fingerprint(directory: str | Path) -> str:
    """A short SHA-256 of the files that define a saved value model (its config, head and LoRA adapter), so a
    resumed job can tell a value model retrained into the same folder from the one it started with.

    Raises:
        VasError: as :func:`check_value_dir`.
    """
    import hashlib

    directory = Path(directory)
    check_value_dir(directory)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, HEAD_NAME, "adapter_config.json", "adapter_model.safetensors"):
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return digest.hexdigest()[:16]


def load_value_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a value model (falls back to its backbone's)."""
    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file():
        return load_tokenizer(str(directory))
    return load_tokenizer(json.loads((directory / CONFIG_NAME).read_text())["backbone"])


def check_same_tokenizer(base: PreTrainedTokenizerBase, value: PreTrainedTokenizerBase, name: str) -> None:
    """Raise :class:`VasError` unless the two tokenizers map text to the same ids.

    Training reads the collected token columns, which are π0's tokenization: a value backbone other than π0
    must share its vocabulary. (While decoding, a value model with another tokenizer reads text instead,
    :class:`TextScorer`.)
    """
    if base.get_vocab() != value.get_vocab():
        raise VasError(
            f"value model {name!r} uses a different tokenizer from the base model "
            f"(vocab {len(value)} vs {len(base)}): train it on a backbone that shares the base model's tokenizer"
        )




@dataclass(frozen=True)
class ValueModelFolder:
    """A saved value model that is not loaded in this process: what an engine that loads value models in its
    own workers (:class:`vas.serving.engine.VllmPolicy`) needs of it. Same attributes as a loaded
    :class:`ValueModel` for that use.

    Attributes:
        name_or_path: the folder, absolute.
        tokenizer: its tokenizer.
        kind: its head (:data:`vas.config.HEADS`).
        dtype: the dtype it is to run in.
    """

    name_or_path: str
    tokenizer: PreTrainedTokenizerBase
    kind: str
    dtype: torch.dtype


def load_value_models(
    folders: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    load: bool = True,
) -> list[ValueModel] | list[ValueModelFolder]:
    """Load value models from their folders for decoding (Sec. 4.2 composition), each with its tokenizer. Every
    folder is checked before any model loads.

    Args:
        folders: the value models' folders.
        load: False: describe each folder (:class:`ValueModelFolder`) without loading its weights, for an
            engine that loads them in its own processes.

    Returns:
        One value model (or folder description) per folder, in order.

    Raises:
        VasError: if a path does not exist or is not a value model.
    """
    for path in folders:
        check_value_dir(path)
    if not load:
        return [ValueModelFolder(str(Path(path).resolve()), load_value_tokenizer(path), value_head(path), dtype)
                for path in folders]
    return [ValueModel.from_pretrained(path, device=device, dtype=dtype) for path in folders]
