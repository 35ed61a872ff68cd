"""The value model V^π0: the model and its candidate scorers (:mod:`vas.value.model`), λ-returns
(:mod:`vas.value.td`) and training on collected samples (:mod:`vas.value.train`)."""
