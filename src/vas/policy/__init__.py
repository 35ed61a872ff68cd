"""The base policy π0 behind one interface: a local transformers model (:mod:`vas.policy.local`) or a model
behind an OpenAI-compatible API (:mod:`vas.policy.api`)."""
