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

from vas.api import ApiPolicy, Endpoint
from vas.decoding import Decoded, Steering, decode, sample
from vas.errors import VasError
from vas.generation import Generation, generate
from vas.guidance import kl_divergence, steered_logprobs
from vas.policies import LocalPolicy
from vas.processor import VASLogitsProcessor
from vas.td import lambda_returns
from vas.value import ValueModel

__version__ = "0.1.0"

__all__ = [
    "ApiPolicy", "Decoded", "Endpoint", "Generation", "LocalPolicy", "Steering", "VASLogitsProcessor", "ValueModel",
    "VasError", "decode", "generate", "kl_divergence", "lambda_returns", "sample", "steered_logprobs",
]
