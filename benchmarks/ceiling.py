"""What the hardware allows through PyTorch: matrix-product throughput at the shapes of one VAS step.

    python benchmarks/ceiling.py [--device cpu] [--out benchmarks/results/ceiling-cpu.json]

At batch B and k candidates the value model reads B·(k+1) tokens per step (the chosen token and the k
candidates) where π0 reads B. This times ``torch.nn.functional.linear`` over the embedded model's layer
shapes (hidden 576, MLP 1536, 9 query / 3 key-value heads of 64) with B·(k+1) rows, in float32 and
bfloat16, and prints the GFLOP/s reached and the least time one value-model step can take at that rate
(linear layers only: attention and norms come on top). This is the rate PyTorch's kernels reach at these
shapes, not the processor's theoretical peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HIDDEN, MLP, LAYERS, KV = 576, 1536, 30, 192
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ceiling-cpu.json")
    args = parser.parse_args()
    results = []
    rows = args.batch * (args.k + 1)
    flops_per_layer = sum(2 * rows * o * i for o, i in SHAPES)
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(o, i, dtype=dtype, device=args.device) for o, i in SHAPES]
        inputs = {i: torch.randn(rows, i, dtype=dtype, device=args.device) for _, i in SHAPES}
        for _ in range(3):
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        repeats = 60
        start = time.perf_counter()
        for _ in range(repeats):
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        rate = flops_per_layer / seconds / 1e9
        results.append({"dtype": str(dtype), "rows": rows, "gflop_per_second": rate,
                        "value_step_linear_ms": 1000 * seconds * LAYERS})
        print(f"{str(dtype):15s} {rows} rows: {rate:6.1f} GFLOP/s; one value-model step of {LAYERS} layers ≥ "
              f"{1000 * seconds * LAYERS:.0f} ms in linear layers")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "batch": args.batch, "k": args.k,
                                    "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
