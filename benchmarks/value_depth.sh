#!/usr/bin/env bash
# The demo's reward with a quarter-depth value model next to the full-depth one, value models in float32
# and bfloat16. Needs a finished demo folder (`vas demo --out DEMO`): its samples/ and value/ are reused.
#
#   benchmarks/value_depth.sh DEMO [OUT]     (OUT defaults to benchmarks/results/value-depth; ≈ 12 min on 2 CPU cores)
set -euo pipefail
demo=$(realpath "$1")
out=${2:-$(dirname "$0")/results/value-depth}
mkdir -p "$out"
cd "$out"
start=$(date +%s)
# the quarter-depth value model goes beside the demo's own (weights stay out of the repository)
[ -d "$demo/value-L7" ] || vas train --data "$demo/samples" --out "$demo/value-L7" --backbone-layers 7 --epochs 2 --lr 1e-3 \
  --lora-rank 16 --lora-alpha 16 --batch-size 16 --seed 0 -q
echo "train L=7: $(( $(date +%s) - start )) s"
for spec in "full:$demo/value" "L7:$demo/value-L7"; do
  for dtype in float32 bfloat16; do
    name=${spec%%:*}-$dtype
    [ -d "$name" ] || vas evaluate --value "${spec#*:}" --out "$name" --prompts chitchat --start 256 --limit 48 \
      --betas 2,5,10 -k 10 --best-of 1 --max-new-tokens 40 --batch-size 16 --seed 0 --value-dtype "$dtype" -q
  done
done
python "$(dirname "$(realpath "$0")")/value_dtype_error.py" "$demo" | tee value-dtype-error.txt
