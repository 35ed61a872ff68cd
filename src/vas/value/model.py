"""The value model V^{π0}: a causal-LM backbone + LoRA + a head (:mod:`vas.value.heads`) on the hidden states.

Paper: Sec. 3.3 and App. C.1 (backbone with a linear head, LoRA-trained, Table 4). One forward pass over
``prompt ⊕ response`` gives V(s_t) for every state: from the hidden state at the last token of s_t (``last``),
the running mean of the hidden states (``mean``), or a histogram of the return (``distributional``).

Decoding needs V(s_t ⊕ x) for the k candidates x of each row. :class:`CandidateScorer` keeps the value
model's KV cache of the prefix and scores all k candidates of all rows in one forward pass: the query is
``[tokens new since the last step, x_1 … x_k]`` with a 4D attention mask in which each candidate sees the
prefix and itself only, all candidates sitting at the row's next position. The candidates' keys are then
cropped from the cache, so the prefix is never re-fed and the cache is never copied.

A value model with a tokenizer of its own (an API base policy, or any other policy tokenizer) scores
candidate *strings* instead: :class:`TextScorer`. Both scorers answer the decoding loop through the same
call, ``score(rollout, candidates, active, beta=None) -> (B, k)`` (``beta``: soft values, per row) (:func:`vas.decoding.loop.scorer_for` picks one).
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

from vas.errors import VasError
from vas.value.heads import HEADS, MEAN_OVER, RunningMean, atoms, make_head, soft_excess, soft_value, two_hot
from vas.models import cache_kwargs, crop_cache, load_backbone, load_tokenizer, position_ids_from_mask

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
        head: str = "last",
        mean_over: str = "response",
        bins: int = 51,
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
    """The head (:data:`vas.value.heads.HEADS`) of the value model saved in ``directory``, read from its config
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


class CandidateScorer:
    """V(s_t ⊕ x) for the k candidates of every row, over a KV cache of the prefix (one forward per step).

    Call :meth:`score` once per decoding step; it reads the tokens appended since the previous call from the
    rollout (``rollout.appended``: the whole left-padded prompt at the first call, the chosen token
    afterwards). State is per generation: make a new scorer for each new batch of prompts. The value model
    must share π0's tokenizer. A ``mean`` head keeps each row's running mean of the hidden states
    (:class:`vas.value.heads.RunningMean`) next to the cache, so it too costs one forward per step. A ``next``
    head reads no candidate at all: the forward covers the new tokens only, and Q(s, x) of every candidate comes
    from the hidden state at s's last token (kept per row for a step that appends nothing).
    """

    def __init__(self, model: ValueModel):
        self.model = model
        self.cache = DynamicCache(config=model.backbone.config)
        self.past_mask: torch.Tensor | None = None  # (B, S_past) {0,1}: real tokens in the cache
        self.lengths: torch.Tensor | None = None  # (B,) real tokens in the cache
        self.pool = RunningMean()  # the mean head's window sums
        self.window_start: torch.Tensor | None = None  # (B,) the mean head's first pooled position; -1: not fed yet
        self.state: torch.Tensor | None = None  # (B, H) the next head's hidden state at each row's last token

    def reorder(self, rows: Sequence[int]) -> None:
        """Keep the cached rows ``rows``, in that order; a row ``-1`` is a new one with nothing fed yet. For a
        batch whose members change between steps (a server's): rows that leave free their cache, columns no
        row uses are dropped, and when the cache has grown much wider than the longest row (rows that joined at
        different steps each bring their padding) every row's tokens are gathered into the longest row's width.

        Args:
            rows: for each row of the new batch, its row in the current one, or -1.
        """
        if self.past_mask is None:  # nothing fed yet: every row starts empty at the first score
            return
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.past_mask.device)
        kept = index >= 0
        source = index.clamp_min(0)
        self.cache.batch_select_indices(source)  # new rows copy row 0's keys; their mask hides them
        self.past_mask = self.past_mask[source] * kept[:, None]
        self.lengths = self.lengths[source] * kept
        self.pool.select(source, kept)
        self.window_start = torch.where(kept, self.window_start[source], -1)
        self.state = self.state[source] * kept[:, None]
        longest = int(self.lengths.max()) if len(self.lengths) else 0
        if self.past_mask.shape[1] > 1.5 * longest + 8:
            self._compact(longest)
        else:  # drop the columns no row uses any more
            used = self.past_mask.bool().any(dim=0)
            if not bool(used.all()):
                columns = used.nonzero().flatten()
                for layer in self.cache.layers:
                    if layer.get_seq_length() > 0:
                        layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]
                self.past_mask = self.past_mask[:, columns]

    def _compact(self, width: int) -> None:
        """Gather each row's cached tokens, in order, into the last ``width`` columns (the longest row's
        length), so that prompts that joined at different steps do not widen the cache for every row."""
        B, S = self.past_mask.shape
        # a stable sort puts each row's padding first and its real tokens after, both in their order
        columns = torch.sort(self.past_mask, dim=1, stable=True).indices[:, S - width:]  # (B, width)
        self.past_mask = self.past_mask.gather(1, columns)
        for layer in self.cache.layers:
            if layer.get_seq_length() > 0:
                index = columns[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    @torch.no_grad()
    def score(self, rollout, candidates: torch.Tensor, active: torch.Tensor | None = None,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        """Append the rollout's new tokens to the prefix and return V(prefix ⊕ x) for each candidate x.

        Args:
            rollout: has ``appended`` (:class:`vas.policy.local.Appended`): ids (B, P) int64 appended since the
                last call (P ≥ 0), mask (B, P) {0,1} with 0 for padding (left padding, finished rows). A row's
                first call appends its prompt, unless the rollout tells ``prompt_lengths`` (B,) int64 (a server
                feeding a prompt and earlier output at once); the mean head's window starts there.
            candidates: (B, k) int64 candidate next tokens.
            active: unused (finished rows are masked by ``appended``); for the common scorer signature.
            beta: (B,) float32 β of each row for soft values (distributional head), or None for V^π0.

        Returns:
            (B, k) float32 values.
        """
        model = self.model
        device = model.device
        new_ids, new_mask = rollout.appended.ids.to(device), rollout.appended.mask.to(device).long()
        candidates = candidates.to(device)
        B, P = new_ids.shape
        if self.past_mask is None:
            self.past_mask = new_mask.new_zeros(B, 0)
            self.lengths = new_mask.new_zeros(B)
            self.window_start = new_mask.new_full((B,), -1)
            self.state = torch.zeros(B, model.backbone.config.hidden_size, device=device)
        if model.kind == "next":
            if P:  # left-padded: a row's newest token is in the last column, if it got any
                hidden, _ = self._feed(new_ids, new_mask, candidates[:, :0])
                self.state = torch.where(new_mask[:, -1:].bool(), hidden[:, -1], self.state)
            return model.head(self.state, candidates)
        hidden, new_positions = self._feed(new_ids, new_mask, candidates)
        if model.kind == "mean":
            first = self.window_start < 0  # rows fed for the first time: their prompt is known now
            prompt_lengths = getattr(rollout, "prompt_lengths", None)
            prompt_lengths = self.lengths if prompt_lengths is None else torch.as_tensor(prompt_lengths, device=device)
            self.window_start = torch.where(first, model.window_start(prompt_lengths), self.window_start)
            self.pool.extend(hidden[:, :P], new_mask.bool() & (new_positions >= self.window_start[:, None]))
            features = self.pool.peek(hidden[:, P:])
        else:
            features = hidden[:, P:]
        return model.values(model.head(features), None if beta is None else beta.to(device)[:, None])

    def _feed(self, new_ids: torch.Tensor, new_mask: torch.Tensor,
              candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over ``[new tokens, candidates]``: the new tokens (B, P) join the cache, the k candidates
        (B, k) are read at the row's next position, each seeing the prefix and itself, and leave no trace.
        Returns the hidden states (B, P + k, H) float32 and the new tokens' positions (B, P) int64."""
        model = self.model
        device = model.device
        B, P = new_ids.shape
        k = candidates.shape[1]
        S = self.past_mask.shape[1]
        new_positions = position_ids_from_mask(new_mask, self.lengths)
        lengths = self.lengths + new_mask.sum(dim=1)
        positions = torch.cat([new_positions, lengths[:, None].expand(B, k)], dim=1)

        # allowed[b, q, key] over keys [past S | new P | candidates k]
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=device))
        allowed = torch.zeros(B, P + k, S + P + k, dtype=torch.bool, device=device)
        allowed[:, :, :S] = self.past_mask.bool()[:, None, :]
        allowed[:, :P, S : S + P] = causal[None] & new_mask.bool()[:, None, :]
        allowed[:, P:, S : S + P] = new_mask.bool()[:, None, :]
        diagonal = torch.arange(P + k, device=device)
        allowed[:, diagonal, S + diagonal] = True  # each query sees itself (candidates: only themselves)
        dtype = model.backbone.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)

        hidden = model.hidden_states(torch.cat([new_ids, candidates], dim=1), mask[:, None], position_ids=positions,
                                     cache=self.cache)
        if k:
            self.cache.crop(-k)
        self.past_mask = torch.cat([self.past_mask, new_mask], dim=1)
        self.lengths = lengths
        return hidden, new_positions


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextCandidateScorer:
    """V(s ⊕ x) for candidate *texts*, for a value model with its own tokenizer (one prompt; Sec. 4.4).

    The base policy's tokens are never seen: the state is text. For each candidate, the response text after
    it, c, the value model reads ``prompt_ids + tokenize(c)`` (an ending candidate, ``None``, reads
    ``prompt_ids + tokenize(text) + [EOS]``), the same tokenization its training rows had
    (:func:`vas.collect.collect` through an API). Appending text can change the last few tokens (merges), so the KV
    cache keeps only the prefix that every candidate's tokenization shares; it is cropped back when a later
    step re-tokenizes the end of the text differently. One forward per call: the new stable tokens, then all
    candidate suffixes laid side by side in one row, each seeing the cache, the new tokens and itself
    (custom 4D mask, the same idea as :class:`CandidateScorer`).
    """

    def __init__(self, model: ValueModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]):
        if model.kind == "next":
            raise VasError("a value model with the next head scores π0's own next tokens, not text: it needs a local "
                           "π0 with its tokenizer, reading the prompt as π0 does (no value prompt, no API policy)")
        if not prompt_ids:
            raise VasError("the value model's prompt is empty after tokenization")
        if tokenizer.eos_token_id is None:
            raise VasError("the value model's tokenizer has no EOS token: ending candidates cannot be scored")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = list(prompt_ids)
        self.cache = DynamicCache(config=model.backbone.config)
        self.cached_ids: list[int] = []  # the ids whose keys and values are in the cache
        self.cached_hidden = torch.zeros(0, model.backbone.config.hidden_size)  # their hidden states (mean head)

    def sequence(self, text: str, candidate: str | None) -> list[int]:
        """The value model's ids of the state whose response is ``candidate`` (``None``: ``text`` ends)."""
        if candidate is None:
            return self.prompt_ids + self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return self.prompt_ids + self.tokenizer(candidate, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, text: str, candidates: Sequence[str | None], beta: float | None = None) -> torch.Tensor:
        """V(prompt ⊕ c) for each candidate response text c.

        Args:
            text: the response so far.
            candidates: k response texts, each ``text`` with one candidate appended (``None``: ``text`` ends).
            beta: β for soft values (distributional head), or None for V^π0.

        Returns:
            (k,) float32 values.
        """
        sequences = [self.sequence(text, c) for c in candidates]
        stable = min(min(common_prefix_length(sequences[0], s) for s in sequences), min(map(len, sequences)) - 1)
        keep = common_prefix_length(self.cached_ids, sequences[0][:stable])
        crop_cache(self.cache, keep)
        new = sequences[0][keep:stable]
        suffixes = [s[stable:] for s in sequences]  # each ≥ 1 token
        device = self.model.device
        P, lengths = len(new), [len(s) for s in suffixes]
        Q = P + sum(lengths)
        positions = list(range(keep, stable)) + [stable + j for n in lengths for j in range(n)]
        allowed = torch.zeros(Q, keep + Q, dtype=torch.bool)
        allowed[:, :keep] = True
        allowed[:, keep : keep + P] = torch.tril(torch.ones(Q, P, dtype=torch.bool))  # suffix rows see all new tokens
        start, ends = P, []
        for n in lengths:  # each suffix sees itself causally
            allowed[start : start + n, keep + start : keep + start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            start += n
            ends.append(start - 1)
        dtype = self.model.backbone.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor([new + [t for s in suffixes for t in s]], device=device)
        model = self.model
        hidden = model.hidden_states(ids, mask[None, None].to(device), position_ids=torch.tensor([positions], device=device),
                                     cache=self.cache)[0]  # (Q, H)
        crop_cache(self.cache, stable)
        self.cached_ids = sequences[0][:stable]
        if model.kind == "mean":  # the window's hidden states: cached prefix, new stable tokens, each suffix
            start = int(model.window_start(torch.tensor(len(self.prompt_ids))))
            self.cached_hidden = torch.cat([self.cached_hidden[:keep].to(hidden.device), hidden[:P]])
            prefix = self.cached_hidden[start:]
            offsets = [P + sum(lengths[:i]) for i in range(len(lengths))]
            features = torch.stack([torch.cat([prefix, hidden[o : o + n]])[max(0, start - len(self.cached_hidden)):].mean(0)
                                    for o, n in zip(offsets, lengths)])
        else:
            features = hidden[ends]
        return model.values(model.head(features), beta).float().cpu()


class TextScorer:
    """The batch form of :class:`TextCandidateScorer`: one per row, each with the row's prompt as the value
    model reads it (through its own chat template), scored one row after another.

    Args:
        model: a value model carrying its tokenizer.
        prompts: the B prompt texts the value model reads.
    """

    def __init__(self, model: ValueModel, prompts: Sequence[str]):
        if model.tokenizer is None:
            raise VasError("the value model has no tokenizer: load it with ValueModel.from_pretrained")
        from vas.prompts import encode_prompts

        self.rows = [TextCandidateScorer(model, model.tokenizer, ids)
                     for ids in encode_prompts(model.tokenizer, list(prompts))]

    def score(self, rollout, candidates: torch.Tensor, active: torch.Tensor,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        """V of each candidate (B, k) float32 of the rollout's active rows (0 for finished rows), read as text
        (``rollout.response_texts()``, ``rollout.candidate_texts``); soft at each row's ``beta`` (B,) if given."""
        texts, options = rollout.response_texts(), rollout.candidate_texts(candidates)
        values = torch.zeros(candidates.shape, dtype=torch.float32)
        for row in active.nonzero().flatten().tolist():
            values[row] = self.rows[row].score(texts[row], options[row], None if beta is None else float(beta[row]))
        return values


@dataclass(frozen=True)
class ValueModelFolder:
    """A saved value model that is not loaded in this process: what an engine that loads value models in its
    own workers (:class:`vas.serving.engine.VllmPolicy`) needs of it. Same attributes as a loaded
    :class:`ValueModel` for that use.

    Attributes:
        name_or_path: the folder, absolute.
        tokenizer: its tokenizer.
        kind: its head (:data:`vas.value.heads.HEADS`).
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
