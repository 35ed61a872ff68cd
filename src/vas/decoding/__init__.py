"""Steered samples: Eq. 5 and the KL (:mod:`vas.decoding.guidance`), the one decoding loop
(:mod:`vas.decoding.loop`), many prompts through it in batches or concurrently, resumably
(:mod:`vas.decoding.batches`), Eq. 5 inside ``model.generate`` (:mod:`vas.decoding.processor`) and the
one-call entry point (:mod:`vas.decoding.generation`)."""
