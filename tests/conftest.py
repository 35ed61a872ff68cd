"""Shared fixtures: a tiny randomly initialised Llama model and byte-level tokenizer saved to a local
directory, so the real loading code (``from_pretrained`` on a path) is exercised in seconds; and the embedded
π0 (SmolLM2-135M-Instruct) with value models on its first layers, each loaded or built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import random_value_model
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vas.config import EMBEDDED_MODEL
from vas.models import embedded_model_dir, load_policy, load_tokenizer
from vas.policy.local import LocalPolicy

CORPUS = [
    "hello how are you doing today? i am fine, thanks for asking.",
    "what a wonderful day, i love it. this is great and happy news!",
    "this is terrible, i hate it. awful sad bad news.",
    "please write a one paragraph explanation about the following topic.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_model_dir(path, *, seed: int = 0, layers: int = 2, vocab_seed_corpus=CORPUS) -> str:
    """Write a tiny Llama causal LM (hidden 32, ``layers`` layers) and its tokenizer to ``path``."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(vocab_seed_corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peakier next-token distribution than the default init, like a real LM
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory) -> str:
    """A tiny model whose tokenizer was trained on different text: a different vocabulary."""
    corpus = ["zebra quartz xylophone jumps", "completely different words here"] * 20
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-other"), vocab_seed_corpus=corpus)


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded π0's tokenizer (:func:`vas.models.load_tokenizer`), shared by the session: read it, never
    change it."""
    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def embedded_policy():
    """The embedded π0, float32, in eval mode with gradients off (:func:`vas.models.load_policy`), shared by the
    session: run it, never change it."""
    return load_policy(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def embedded_local(embedded_policy, embedded_tokenizer) -> LocalPolicy:
    """The project's own decoding loop's π0: :class:`LocalPolicy` on the embedded model and its tokenizer."""
    return LocalPolicy(embedded_policy, embedded_tokenizer)


EMBEDDED_VALUE_MODELS = {
    "kind": (1, {}), "short": (2, {"head": "mean"}),
    "odds": (3, {"head": "distributional", "bins": 11, "support": (-1.0, 1.0)}), "ahead": (4, {"head": "next"}),
    "a": (4, {}), "b": (5, {}),
}
"""The value models :func:`embedded_value_dir` builds: name → (seed, the head's arguments to
:meth:`vas.value.model.ValueModel.create`)."""


@pytest.fixture(scope="session")
def embedded_value_dir(tmp_path_factory):
    """``embedded_value_dir(name)``: the folder of the value model ``name`` of :data:`EMBEDDED_VALUE_MODELS`, on
    the embedded model's first 2 layers with random LoRA and head (:func:`helpers.random_value_model`), saved
    on its first use in the session."""
    folder = tmp_path_factory.mktemp("embedded-values")

    def build(name: str) -> str:
        path = folder / name
        if not path.is_dir():
            seed, head = EMBEDDED_VALUE_MODELS[name]
            random_value_model(str(embedded_model_dir()), seed=seed, num_layers=2, **head).save_pretrained(path)
        return str(path)

    return build
