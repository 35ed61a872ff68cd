"""Value Augmented Sampling (Han et al., 2024): steer a frozen language model π0 towards a reward at
decoding time with a separately trained value model.

The public API, in data-flow order::

    import vas
    value = vas.ValueModel.from_pretrained("runs/value")          # a trained value model, with its tokenizer
    out = vas.generate(model, tokenizer, ["Tell me about your day."], value_models=[value], beta=5.0, top_k=10)
    out[0].text, out[0].kl                                          # the response and KL(π‖π0) in nats

* :class:`ValueModel`: V(s), backbone + LoRA + linear head (Sec. 3.3, App. C.1).
* :func:`generate`: responses from π ∝ π0 · exp(β Σ_i w_i V_i) over π0's top-k (Eq. 5, Sec. 4.2).
* :class:`Steering` and :func:`sample` / :func:`decode`: the decoding loop itself, with per-row β and weights.
* :class:`LocalPolicy`, :class:`ApiPolicy` (with :class:`Endpoint`): π0 as a local model or behind an
  OpenAI-compatible API (Sec. 4.4).
* :class:`VASLogitsProcessor`: Eq. 5 inside transformers' ``model.generate``.
* :func:`steered_logprobs`, :func:`kl_divergence`, :func:`lambda_returns`: the maths, as pure functions.
"""

import importlib

__version__ = "0.1.0"

# name -> module; imported on first use (PEP 562), so that `vas --help` does not load torch
_EXPORTS = {
    "ApiPolicy": "vas.policy.api", "Endpoint": "vas.policy.api",
    "Decoded": "vas.decoding.loop", "Steering": "vas.decoding.loop", "decode": "vas.decoding.loop", "sample": "vas.decoding.loop",
    "VasError": "vas.errors",
    "Generation": "vas.decoding.generation", "generate": "vas.decoding.generation",
    "kl_divergence": "vas.decoding.guidance", "steered_logprobs": "vas.decoding.guidance",
    "LocalPolicy": "vas.policy.local",
    "VASLogitsProcessor": "vas.decoding.processor",
    "lambda_returns": "vas.value.td",
    "ValueModel": "vas.value.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
