"""Configuration as dataclasses, documented field by field; the ``vas`` command builds its options from the
fields (each field's ``help`` metadata is the option's help, ``flags`` its names).

* :class:`PolicyConfig`: where the base policy π0 lives, a local model or one behind an OpenAI-compatible API;
  shared by ``collect``, ``generate`` and ``evaluate``. :func:`vas.base_policy.build_policy` turns it into π0.
* :class:`CollectConfig`: how π0's responses are sampled for training data (``vas collect``, :func:`vas.collect.collect`).
* :class:`TrainConfig`: how a value model is trained (``vas train``, :func:`vas.value.train.train_value_model`).
* :class:`EvaluateConfig`: which conditions an evaluation compares (``vas evaluate``, :func:`vas.evaluate.evaluate`).

The module imports no torch, nor any other module of vas but its errors: the CLI reads it to build its options,
and the model code reads its names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from vas.errors import VasError

EMBEDDED_MODEL = "smollm2-135m-instruct"
"""The embedded base model π0, converted once from its GGUF (:func:`vas.models.embedded_model_dir`)."""
DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What every ``--dtype`` takes: ``auto`` (the machine's: :func:`vas.models.resolve_dtype`) or a torch dtype's name."""
HEADS = ("last", "mean", "distributional", "next")
"""The value heads (:mod:`vas.value.heads`)."""
MEAN_OVER = ("response", "all")
"""The mean head's windows: from the prompt's last token, or from its first (the prompt too)."""


def check_positive(**settings: float) -> None:
    """Raise :class:`VasError` naming (as its option) the first of ``settings`` that is not > 0."""
    for name, value in settings.items():
        if not value > 0:
            raise VasError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _help(text: str, *flags: str, metavar: str | None = None) -> dict:
    """A field's CLI metadata: its help text and, optionally, its option names and the placeholder of its value."""
    return {"help": text, "flags": flags, "metavar": metavar}


@dataclass
class PolicyConfig:
    """π0: a local causal LM, or one behind an OpenAI-compatible endpoint (Sec. 4.4) when ``api_base_url`` is set.

    Attributes:
        base_model: the local model: ``smollm2-135m-instruct`` (embedded), a local directory or a hub id.
        engine: what runs a local model: ``transformers`` or ``vllm`` (:class:`vas.serving.engine.VllmPolicy`).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` …
        dtype: π0's dtype: ``auto`` (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.
        api_base_url: the endpoint, e.g. ``http://127.0.0.1:8000/v1``; None for a local model.
        api_model: the model's name at the endpoint.
        api_key_env: the environment variable holding the API key.
        api_chat: use the chat endpoint (steering needs a server that continues a partial assistant
            message, e.g. vLLM's ``continue_final_message``).
        api_template: completions endpoint: format prompts with this local model's chat template.
        api_extra: extra JSON fields for every request (a JSON object, as text).
        api_stop: strings that end a response.
        api_stream: ask for each next token as a stream (completions endpoint).
        concurrency: requests in flight at once (API).
        timeout: seconds per request, in s; 429, 5xx and timeouts are retried with backoff.
    """

    base_model: str = field(default=EMBEDDED_MODEL, metadata=_help(
        "Base policy π0: 'smollm2-135m-instruct' (embedded), a local directory or a hub id.", "--base-model", "-m"))
    engine: str = field(default="transformers", metadata=_help(
        "Local π0's engine: 'transformers' (this process), or 'vllm' (batches decoded inside vLLM, with the "
        "processor `vas serve` uses; needs vLLM)."))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1' …"))
    dtype: str = field(default="auto", metadata=_help("'auto' (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16."))
    api_base_url: Optional[str] = field(default=None, metadata=_help(
        "Use π0 behind this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) instead of a local model."))
    api_model: str = field(default="default", metadata=_help("The model's name at --api-base-url."))
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=_help("Environment variable holding the API key."))
    api_chat: bool = field(default=False, metadata=_help(
        "Use the chat endpoint (steering needs a server that continues a partial assistant message, e.g. vLLM)."))
    api_template: Optional[str] = field(default=None, metadata=_help(
        "Completions endpoint: format prompts with this local model's chat template (e.g. smollm2-135m-instruct); "
        "default: send them as they are."))
    api_extra: str = field(default="{}", metadata=_help(
        "Extra JSON fields for every request, e.g. '{\"top_k\": 0, \"min_p\": 0}' for llama.cpp."))
    api_stop: list[str] = field(default_factory=list, metadata=_help("A string that ends a response; repeat for several.",
                                                                    metavar="TEXT"))
    api_stream: bool = field(default=False, metadata=_help(
        "Ask for each next token as a stream (completions): the same answer, 4-5x faster from llama-cpp-python's "
        "server with a large vocabulary."))
    concurrency: int = field(default=8, metadata=_help("Requests in flight at once (API)."))
    timeout: float = field(default=60.0, metadata=_help("Seconds per request; 429, 5xx and timeouts are retried with backoff."))

    @property
    def name(self) -> str:
        """What names π0 in stored settings: the endpoint, or the local model."""
        return self.api_base_url or self.base_model


@dataclass(frozen=True)
class CollectConfig:
    """How π0's responses are sampled and scored for a value model's training data (:func:`vas.collect.collect`;
    paper Sec. 3.3, App. C.1: temperature 0.7).

    Attributes:
        samples_per_prompt: responses sampled per prompt.
        temperature: π0's sampling temperature τ.
        max_new_tokens: the most tokens per response.
        batch_size: responses per batch of a local π0, batch b sampled with seed (seed, b): also the resume
            granularity.
        seed: seeds the sampling.

    Raises:
        VasError: on construction, naming the first setting that is not > 0 (seed aside).
    """

    samples_per_prompt: int = field(default=2, metadata=_help("Responses sampled per prompt."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature τ of π0 (the paper collects at 0.7)."))
    max_new_tokens: int = field(default=64, metadata=_help("Most tokens generated per response."))
    batch_size: int = field(default=16, metadata=_help("Responses generated per batch (also the resume granularity)."))
    seed: int = field(default=0, metadata=_help("Random seed."))

    def __post_init__(self) -> None:
        check_positive(samples_per_prompt=self.samples_per_prompt, batch_size=self.batch_size,
                       temperature=self.temperature, max_new_tokens=self.max_new_tokens)


@dataclass
class TrainConfig:
    """How a value model is trained on collected π0 samples (paper Sec. 3.3, App. C.1, Table 4).

    Attributes:
        backbone: the value model's causal-LM backbone; None: the data's base model (π0's own weights).
        backbone_layers: keep only the backbone's first L layers (a cheaper value model); None: all.
        lam: λ of the TD(λ) targets (Table 4: 0.95); 0 is TD(0), 1 Monte-Carlo.
        gamma: the discount γ (paper: 1).
        epochs: training epochs (may be fractional).
        learning_rate: AdamW's learning rate, linearly decayed.
        batch_size: sequences per step.
        lora_rank: LoRA rank r (Table 4: 32; 16 here, which the demo and the experiments use).
        lora_alpha: LoRA α (set equal to the rank).
        val_fraction: fraction of prompts held out for validation (whole prompts, never split).
        dtype: the compute dtype: ``auto`` (bfloat16 on CUDA, float16 where CUDA lacks bf16, float32 on CPU),
            ``float32``, or ``bfloat16`` / ``float16`` mixed precision (the trained weights stay float32; float16
            needs CUDA).
        head: how the value model reads a state (:mod:`vas.value.heads`): ``last`` (the hidden state at its last
            token, the paper's), ``mean`` (the running mean of the hidden states over the window ``mean_over``)
            or ``distributional`` (a point value beside a histogram of the return over ``bins`` atoms spanning
            the training rewards' range, trained by cross-entropy on distributional λ-returns that end at the point
            value of the finished response; needs γ = 1) or ``next`` (Q(s, x) for
            every next token x from the state's last hidden state: one value-model token per step while decoding,
            and ``--top-k all`` affordable).
        mean_over: the mean head's window: ``response`` (from the prompt's last token) or ``all`` (the prompt too).
        bins: the distributional head's atoms.
        save_steps: checkpoint every N steps into ``<out>.checkpoints``; None: once per epoch.
        seed: seeds the split, the initialisation and the data order: on a CPU the same seed, data and settings
            give the same value model bit for bit (on one machine, torch version and thread count).
    """

    backbone: Optional[str] = field(default=None, metadata=_help(
        "Value backbone (causal LM); default: the data's base model."))
    backbone_layers: Optional[int] = field(default=None, metadata=_help(
        "Keep only the backbone's first L layers: a cheaper value model (L = depth/4 costs about a quarter)."))
    lam: float = field(default=0.95, metadata=_help("TD(λ): 0.95 (paper); 0 = TD(0); 1 = Monte-Carlo.", "--lambda"))
    gamma: float = field(default=1.0, metadata=_help("Discount γ (paper: 1)."))
    epochs: float = field(default=2.0, metadata=_help("Training epochs."))
    learning_rate: float = field(default=1e-3, metadata=_help("Learning rate (AdamW, linearly decayed).", "--lr"))
    batch_size: int = field(default=16, metadata=_help("Sequences per step."))
    lora_rank: int = field(default=16, metadata=_help("LoRA rank (Table 4: 32)."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA α."))
    val_fraction: float = field(default=0.1, metadata=_help("Fraction of prompts held out for validation."))
    dtype: str = field(default="auto", metadata=_help(
        "'auto' (bf16 on CUDA, float32 on CPU), float32, or bfloat16 / float16 mixed precision (float16: CUDA only)."))
    head: str = field(default="last", metadata=_help(
        "Value head: 'last' (the last token's hidden state, the paper's), 'mean' (the running mean of the hidden "
        "states from the prompt's last token on), 'distributional' (a value and a histogram of where π0's "
        "continuations lead, for --soft values) "
        "or 'next' (the value of every next token from one hidden state: the cheapest to steer with, and -k all)."))
    mean_over: str = field(default="response", metadata=_help(
        "The mean head's window: 'response' (from the prompt's last token) or 'all' (the prompt too)."))
    bins: int = field(default=51, metadata=_help("The distributional head's atoms over the training rewards' range."))
    save_steps: Optional[int] = field(default=None, metadata=_help("Checkpoint every N steps (default: every epoch)."))
    seed: int = field(default=0, metadata=_help("Random seed."))

    def check(self) -> None:
        """Raise :class:`VasError` naming the first setting out of range."""
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise VasError(f"--lambda and --gamma must lie in [0, 1], got {self.lam} and {self.gamma}")
        for name, value in (("epochs", self.epochs), ("lr", self.learning_rate), ("batch-size", self.batch_size),
                            ("lora-rank", self.lora_rank), ("lora-alpha", self.lora_alpha),
                            ("save-steps", self.save_steps or 1), ("backbone-layers", self.backbone_layers or 1)):
            if not value > 0:
                raise VasError(f"--{name} must be > 0, got {value}")
        if not 0 <= self.val_fraction < 1:
            raise VasError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.dtype not in DTYPES:
            raise VasError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {self.dtype!r}")
        if self.head not in HEADS:
            raise VasError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.mean_over not in MEAN_OVER:
            raise VasError(f"--mean-over must be {' or '.join(MEAN_OVER)}, got {self.mean_over!r}")
        if self.head == "distributional" and self.bins < 2:
            raise VasError(f"--head distributional needs --bins ≥ 2, got {self.bins}")
        if self.head == "distributional" and self.gamma != 1:
            raise VasError(f"--head distributional needs --gamma 1 (its atoms do not shrink with γ), got {self.gamma}")
        if self.head != "distributional" and self.bins != TrainConfig.bins:
            raise VasError("--bins is for --head distributional")
        if self.head != "mean" and self.mean_over != TrainConfig.mean_over:
            raise VasError("--mean-over is for --head mean")


@dataclass
class EvaluateConfig:
    """Which conditions an evaluation compares, and how they are sampled (:func:`vas.evaluate.evaluate`). The
    ``vas evaluate`` command parses its own options (comma-separated grids, ``--top-k all``) into one.

    Attributes:
        betas: VAS's β grid, one condition per β.
        top_k: k, π0's top-k tokens scored by the value models (an int ≥ 1, or ``"all"``); also what plain
            sampling asks a policy that tells only its top-k for.
        best_of: the N of Best-of-N, integers from 1 to 4096; the pool holds ``max(best_of)`` π0 samples per
            prompt (made ints on construction).
        vas_samples_per_prompt: steered samples per prompt (of VAS and of each fine-tuned policy).
        soft: guide with soft values (distributional value models) instead of the mean.
        temperature: the sampling temperature τ of every condition.
        max_new_tokens: the most tokens per response.
        batch_size: responses per batch.
        seed: the pool's seed; VAS and the fine-tuned policies sample with seed + 1.

    Raises:
        VasError: on construction, for a batch size, temperature or token budget that is not > 0, or a
            ``best_of`` that is not integers from 1 to 4096.
    """

    betas: Sequence[float] = (1.0, 2.0, 4.0)
    top_k: int | str = 10
    best_of: Sequence[int] = (1, 2, 4, 8, 16)
    vas_samples_per_prompt: int = 1
    soft: bool = False
    temperature: float = 0.7
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(batch_size=self.batch_size, temperature=self.temperature, max_new_tokens=self.max_new_tokens)
        ns = self.best_of
        if not ns or min(ns) < 1 or max(ns) > 4096 or any(n != int(n) for n in ns):
            raise VasError(f"--best-of needs integers from 1 to 4096, got {ns!r}")
        self.best_of = tuple(int(n) for n in ns)


FINETUNE_METHODS = ("dpo", "rloo", "grpo")


@dataclass(frozen=True)
class FinetuneConfig:
    """How π0 is fine-tuned with LoRA through TRL into a baseline policy π_θ (:func:`vas.finetune.finetune`): the
    methods VAS is compared with (paper Sec. 5, Fig. 2/3, Table 1).

    Attributes:
        method: ``dpo`` (offline, on preference pairs from the collected π0 samples:
            :func:`vas.finetune.preference_pairs`), ``rloo`` or ``grpo`` (online: π_θ samples responses to the
            data's prompts and is rewarded by the reward function, with a KL penalty against π0). PPO is not
            offered: TRL's PPO needs a reward *model* (a torch module), and recent TRL releases no longer ship it.
        kl_coef: the KL penalty's coefficient: DPO's β (the implicit objective is r − β·KL(π_θ‖π0)), the KL
            coefficient of RLOO (subtracted from the reward per sequence) or GRPO (added to the loss per token,
            against advantages normalised within each group, so its scale differs from RLOO's); > 0. Not VAS's β
            (which plays the role of 1/kl_coef: π ∝ π0·exp(β·V)).
        epochs: passes over the pairs (DPO) or the prompts (online: each pass draws ``samples_per_prompt`` responses
            per prompt).
        learning_rate: AdamW's learning rate, linearly decayed.
        batch_size: pairs (DPO) or sampled responses (online; a multiple of ``samples_per_prompt``) per step.
        lora_rank: LoRA rank r on every linear layer of π0.
        lora_alpha: LoRA α.
        samples_per_prompt: online: responses drawn per prompt and step (RLOO's leave-one-out group, GRPO's
            group); None: as many as the data holds per prompt.
        max_new_tokens: online: the most tokens per sampled response; None: the data's.
        temperature: online: the sampling temperature τ of π_θ (and of the KL term); None: the data's.
        snapshots: adapters kept at evenly spaced steps, the final one included: 1 keeps only the final one, 2
            also the one halfway (in ``<out>/snapshots/step-N``), each a policy of its own for evaluation.
        save_steps: checkpoint every N steps into ``<out>.checkpoints``; None: once per epoch.
        seed: seeds LoRA's initialisation, the data order and the sampling.
    """

    method: str = field(default="dpo", metadata=_help("'dpo' (offline, on the collected samples), 'rloo' or 'grpo' "
                                                      "(online RL with a KL penalty against π0)."))
    kl_coef: float = field(default=0.1, metadata=_help("KL coefficient: DPO's β, or RLOO's / GRPO's KL penalty (> 0)."))
    epochs: float = field(default=2.0, metadata=_help("Passes over the pairs (DPO) or the prompts (online)."))
    learning_rate: float = field(default=2e-4, metadata=_help("Learning rate (AdamW, linearly decayed).", "--lr"))
    batch_size: int = field(default=16, metadata=_help("Pairs (DPO) or sampled responses (online) per step."))
    lora_rank: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA α."))
    samples_per_prompt: Optional[int] = field(default=None, metadata=_help(
        "Online: responses per prompt and step (the group RLOO/GRPO compare); default: the data's per prompt."))
    max_new_tokens: Optional[int] = field(default=None, metadata=_help("Online: most tokens per response; default: the data's."))
    temperature: Optional[float] = field(default=None, metadata=_help("Online: sampling temperature; default: the data's."))
    snapshots: int = field(default=1, metadata=_help(
        "Adapters kept at evenly spaced steps (2: also the halfway one, in OUT/snapshots/step-N), each evaluable."))
    save_steps: Optional[int] = field(default=None, metadata=_help("Checkpoint every N steps (default: every epoch)."))
    seed: int = field(default=0, metadata=_help("Random seed."))

    def check(self) -> None:
        """Raise :class:`VasError` naming the first setting out of range."""
        if self.method == "ppo":
            raise VasError("--method ppo is not offered: TRL's PPO needs a reward model (a torch module scoring token "
                           "states), not a reward function of the text, and recent TRL no longer ships it; use --method "
                           "rloo (online, KL penalty in the reward, as PPO's) or grpo")
        if self.method not in FINETUNE_METHODS:
            raise VasError(f"--method must be one of {', '.join(FINETUNE_METHODS)}, got {self.method!r}")
        for name, value in (("kl-coef", self.kl_coef), ("epochs", self.epochs), ("lr", self.learning_rate),
                            ("batch-size", self.batch_size), ("lora-rank", self.lora_rank),
                            ("lora-alpha", self.lora_alpha), ("samples-per-prompt", self.samples_per_prompt),
                            ("max-new-tokens", self.max_new_tokens), ("temperature", self.temperature),
                            ("save-steps", self.save_steps), ("snapshots", self.snapshots)):
            if value is not None and not (0 < value < math.inf):
                raise VasError(f"--{name} must be a finite number > 0, got {value}")
        if self.batch_size > 2**20:
            raise VasError(f"--batch-size must be at most {2**20}, got {self.batch_size}")
