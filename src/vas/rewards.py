"""Rewards: a batch of (prompt, response) texts → a (B,) float32 tensor, one scalar per response.

Built-in rewards (names usable in ``--reward`` specs):

* ``positivity``: VADER compound sentiment of the response, in [−1, 1].
* ``verbosity``: words in the response / 100 (the paper's Verbosity/Conciseness task uses length).
* ``brevity``: −words / 100.
* ``offensive``: probability that the response is offensive (``alt-profanity-check``), in [0, 1].
* ``hf:PATH``: a Hugging Face sequence-classification reward model (e.g.
  OpenAssistant/reward-model-deberta-v3-large-v2), fed (prompt, response) pairs; the reward is the logit
  of class ``label`` (0 by default).
* ``py:MODULE:FUNCTION``: any callable ``f(prompts, responses) -> sequence of floats``.

A spec combines several with weights: ``"positivity=1,brevity=0.5"`` is 1·positivity + 0.5·brevity.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Protocol, Sequence

import torch

from vas.errors import VasError


class Reward(Protocol):
    """The reward interface: ``reward(prompts, responses)`` → (B,) float32 tensor."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...


def word_count(text: str) -> int:
    """Whitespace-separated words in ``text``: the unit of the verbosity and brevity rewards."""
    return len(text.split())


class Positivity:
    """VADER compound sentiment score of each response, in [−1, 1] (Hutto & Gilbert, 2014)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, responses):
        return torch.tensor([self._analyzer.polarity_scores(r)["compound"] for r in responses], dtype=torch.float32)


class TextBlobPolarity:
    """TextBlob's pattern-lexicon polarity of each response, in [−1, 1]: a second sentiment scorer, built
    independently of VADER, used as a judge that positivity value models were not trained on."""

    def __init__(self):
        from textblob import TextBlob

        self._blob = TextBlob

    def __call__(self, prompts, responses):
        return torch.tensor([self._blob(r).sentiment.polarity for r in responses], dtype=torch.float32)


class WordCount:
    """``sign`` · (words in the response) / ``per``: verbosity (sign +1) or brevity (sign −1)."""

    def __init__(self, sign: float = 1.0, per: float = 100.0):
        self.sign, self.per = sign, per

    def __call__(self, prompts, responses):
        return torch.tensor([self.sign * word_count(r) / self.per for r in responses], dtype=torch.float32)


class Offensiveness:
    """Probability that each response is offensive, from ``alt-profanity-check`` (a linear SVM), in [0, 1]."""

    def __init__(self):
        from profanity_check import predict_prob

        self._predict = predict_prob

    def __call__(self, prompts, responses):
        return torch.as_tensor(self._predict(list(responses)), dtype=torch.float32)


class ClassifierReward:
    """A Hugging Face sequence-classification model as reward: logit ``label`` of (prompt, response) pairs.

    Raises:
        VasError: if the model cannot be loaded, or ``label`` is not one of its outputs.
    """

    def __init__(self, spec: str, label: int = 0, batch_size: int = 16, device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from vas.models import load_pretrained

        self.tokenizer = load_pretrained(AutoTokenizer, spec, marker="tokenizer_config.json")
        self.model = load_pretrained(AutoModelForSequenceClassification, spec).to(device).eval()
        if not 0 <= label < self.model.config.num_labels:
            raise VasError(f"reward model {spec!r} has {self.model.config.num_labels} labels, asked for label {label}")
        self.label, self.batch_size = label, batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses):
        out = []
        for i in range(0, len(responses), self.batch_size):
            enc = self.tokenizer(
                list(prompts[i : i + self.batch_size]), list(responses[i : i + self.batch_size]),
                padding=True, truncation=True, return_tensors="pt",
            ).to(self.model.device)
            out.append(self.model(**enc).logits[:, self.label].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _import_from_here(module_name: str):
    """Import ``module_name`` from ``sys.path``, else from the current folder (as ``python -m`` would, which the
    ``vas`` script does not put on ``sys.path``), which is then added to ``sys.path``."""
    top = module_name.split(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != top or here in (os.path.abspath(p or ".") for p in sys.path):
            raise
    sys.path.insert(0, here)
    return importlib.import_module(module_name)


class CallableReward:
    """A user function ``f(prompts, responses) -> sequence of floats``, named as ``module:function``; the module
    is imported from ``sys.path`` (``PYTHONPATH``) or the current folder."""

    def __init__(self, target: str):
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise VasError(f"callable reward {target!r} must be written module:function")
        try:
            self.fn: Callable = getattr(_import_from_here(module_name), attr)
        except ModuleNotFoundError as exc:
            if exc.name != module_name.split(".")[0]:
                raise VasError(f"cannot import reward function {target!r}: {exc}") from exc
            raise VasError(f"cannot import reward function {target!r}: no module {exc.name!r} in the current folder or "
                           f"on PYTHONPATH (run vas where {exc.name}.py is, or set PYTHONPATH to its folder)") from exc
        except (ImportError, AttributeError) as exc:
            raise VasError(f"cannot import reward function {target!r}: {exc}") from exc
        if not callable(self.fn):
            raise VasError(f"reward {target!r} is not a function")

    def __call__(self, prompts, responses):
        return torch.as_tensor(list(self.fn(list(prompts), list(responses))), dtype=torch.float32)


class WeightedReward:
    """Σ_i w_i · r_i(prompt, response) over several rewards."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        self.terms = list(terms)

    def __call__(self, prompts, responses):
        total = torch.zeros(len(responses), dtype=torch.float32)
        for reward, weight in self.terms:
            total += weight * reward(prompts, responses).float()
        return total


_BUILTIN: dict[str, Callable[[], Reward]] = {
    "positivity": Positivity,
    "verbosity": lambda: WordCount(+1.0),
    "brevity": lambda: WordCount(-1.0),
    "textblob": TextBlobPolarity,
    "offensive": Offensiveness,
}


def _one(name: str) -> Reward:
    if name in _BUILTIN:
        return _BUILTIN[name]()
    if name.startswith("hf:"):
        return ClassifierReward(name[3:])
    if name.startswith("py:"):
        return CallableReward(name[3:])
    raise VasError(f"unknown reward {name!r}: use one of {', '.join(_BUILTIN)}, hf:PATH or py:MODULE:FUNCTION")


def load_reward(spec: str) -> Reward:
    """Build a reward from a spec such as ``"positivity"`` or ``"positivity=1,brevity=0.5"``.

    Raises:
        VasError: for an unknown name, a bad weight, or an empty spec.
    """
    terms = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise VasError(f"empty term in reward spec {spec!r}")
        name, weight = item, 1.0
        head, sep, tail = item.rpartition("=")
        if sep:
            try:
                name, weight = head.strip(), float(tail)
            except ValueError:
                raise VasError(f"bad weight in reward spec {item!r}: write name=NUMBER") from None
        terms.append((_one(name), weight))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return WeightedReward(terms)


def score(reward: Reward, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Call ``reward`` and check its output: (B,) finite float32.

    Raises:
        VasError: if the reward returns the wrong shape or a non-finite value (NaN or ±inf).
    """
    try:
        values = torch.as_tensor(reward(prompts, responses), dtype=torch.float32).reshape(-1)
    except VasError:
        raise
    except Exception as exc:  # a user's reward function failed: name it, keep its message
        raise VasError(f"the reward failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if values.shape[0] != len(responses):
        raise VasError(f"reward returned {values.shape[0]} values for {len(responses)} responses")
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise VasError(f"reward returned a non-finite value ({values[i].item()}) for response {i}: {responses[i][:60]!r}")
    return values
