"""Serving VAS: the vLLM logits processor, `vas serve`, and the offline vLLM engine path."""
