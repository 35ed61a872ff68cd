"""How far a value model's outputs move in bfloat16: |V_bf16 − V_fp32| over every state of 32 collected responses.

    python benchmarks/value_dtype_error.py DEMO     (a finished `vas demo --out DEMO` folder)
"""

import sys

import datasets
import torch

from vas.value.train import ValueCollator, state_values
from vas.value.model import ValueModel, load_value_tokenizer


def main() -> None:
    demo = sys.argv[1]
    rows = datasets.load_from_disk(f"{demo}/samples").select(range(32))
    batch = ValueCollator(pad_token_id=load_value_tokenizer(f"{demo}/value").pad_token_id)(list(rows))
    values = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ValueModel.from_pretrained(f"{demo}/value", dtype=dtype)
        with torch.no_grad():
            values[dtype] = state_values(model, batch)[batch["state_mask"]]
    full = values[torch.float32]
    diff = (values[torch.bfloat16] - full).abs()
    print(f"states {diff.numel()}: V std {full.std():.4f}, range [{full.min():.3f}, {full.max():.3f}]; |V_bf16 − V_fp32| "
          f"mean {diff.mean():.4f}, 99th percentile {diff.quantile(0.99):.4f}, max {diff.max():.4f}")


if __name__ == "__main__":
    main()
