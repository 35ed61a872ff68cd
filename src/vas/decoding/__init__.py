"""Steered samples: Eq. 5 and the KL (:mod:`vas.decoding.guidance`), the one decoding loop
(:mod:`vas.decoding.loop`), Eq. 5 inside ``model.generate`` (:mod:`vas.decoding.processor`) and the
one-call entry point (:mod:`vas.decoding.generation`)."""
