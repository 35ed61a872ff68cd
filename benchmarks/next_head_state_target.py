"""Does the next head learn better with V(s_t) = Σ_x π0(x | s_t)·Q(s_t, x) regressed too? One measurement.

    python benchmarks/next_head_state_target.py --experiment runs/experiments/value-heads [--out FILE]

The next head (:class:`vas.value.heads.NextTokenHead`) is trained on Q(s_t, x_{t+1}) → G^λ_{t+1}, the token the
response took. This script trains a second next-head value model on the same data, recipe and seed as
`vas experiment value-heads`'s, whose loss adds (Σ_x π0(x | s_t)·Q(s_t, x) − G^λ_t)² for t = 0 … T−1 (π0 at the
collection's temperature): every state's value as π0's expectation of the head over the whole vocabulary,
which also trains s_0 and the tokens π0 did not take. Because Q is linear in the token's embedding,
Σ_x π0(x|s)·Q(s, x) = w·h_s + b + ē_sᵀ·A·h_s with ē_s = Σ_x π0(x|s)·e_x, which is computed once per training
state from π0 (no π0 forward during training).

Both value models are then scored as the experiment scores its heads: R² at the finished validation responses
and at App. C.1's halfway labels (the experiment's cached ``halfway_labels.json``). It needs the experiment's
folder, with the next head trained (its stage's samples and value model are read from there).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch

import vas.value.train as training
from vas.config import TrainConfig
from vas.models import EMBEDDED_MODEL, load_policy, load_tokenizer
from vas.value.td import lambda_returns
from vas.value.train import ValueCollator, ValueTrainer

TEMPERATURE = 0.7


@torch.no_grad()
def expected_embeddings(data: datasets.Dataset, batch_size: int = 8) -> list[list[list[float]]]:
    """ē_t = Σ_x π0(x | s_t)·e_x for t = 0 … T−1 of every row (π0 at τ = 0.7, the embedded model's input
    embeddings, which the value model's backbone shares), as lists (T, H)."""
    policy = load_policy(EMBEDDED_MODEL)
    embedding = policy.get_input_embeddings().weight.float()  # (V, H)
    out = []
    for start in range(0, len(data), batch_size):
        rows = data.select(range(start, min(start + batch_size, len(data))))
        seqs = [list(p) + list(r) for p, r in zip(rows["prompt_ids"], rows["response_ids"])]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, seq in enumerate(seqs):
            ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        logits = policy(input_ids=ids, attention_mask=mask).logits.float()
        for b, (prompt, response) in enumerate(zip(rows["prompt_ids"], rows["response_ids"])):
            L, T = len(prompt), len(response)
            probs = torch.softmax(logits[b, L - 1 : L - 1 + T] / TEMPERATURE, dim=-1)  # states s_0 … s_{T-1}
            out.append((probs @ embedding).tolist())
        print(f"\rπ0's expected embeddings: {len(out)}/{len(data)} rows", end="", flush=True)
    print()
    return out


class StateCollator(ValueCollator):
    """:class:`ValueCollator` plus ``expected`` (B, T_max, H): ē_t of each row's states s_0 … s_{T-1}."""

    def __call__(self, rows):
        batch = super().__call__(rows)
        T = batch["state_mask"].shape[1]
        H = len(rows[0]["expected"][0])
        expected = torch.zeros(len(rows), T, H)
        for b, row in enumerate(rows):
            expected[b, : len(row["expected"])] = torch.tensor(row["expected"])
        batch["expected"] = expected
        return batch


class StateTargetTrainer(ValueTrainer):
    """The next head's TD(λ) loss on the taken tokens plus the state-value loss on s_0 … s_{T-1}."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        value_model = self.accelerator.unwrap_model(model)
        head = value_model.head
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = value_model.hidden_states(ids, mask)  # (B, S, H)
        outputs = torch.cat([head.baseline(hidden[:, :1]), head(hidden[:, :-1], ids[:, 1:, None])], dim=1)[..., 0]
        values = outputs.gather(1, inputs["state_index"])  # V(s_t) = Q(s_{t-1}, x_t), t = 0 … T_max
        states = inputs["state_mask"]
        targets = lambda_returns(values.detach(), inputs["reward"], states, lam=self.lam, gamma=self.gamma)
        taken = training.regressed_states("next", states)
        h = hidden.gather(1, inputs["state_index"][..., None].expand(-1, -1, hidden.shape[-1]))  # h at s_t
        state_value = head.baseline(h)[..., 0] + (inputs["expected"] * head.mix(h)).sum(dim=-1)
        last = states.sum(dim=1, keepdim=True) - 1
        before_end = states & (torch.arange(states.shape[1])[None, :] < last)  # s_0 … s_{T-1}
        loss = ((values - targets) ** 2)[taken].mean() + ((state_value - targets) ** 2)[before_end].mean()
        return (loss, {"values": values}) if return_outputs else loss


def r2(directory: Path, data: datasets.Dataset, halfway_json: Path) -> dict:
    from vas.experiments.ablations import held_out_labels
    from vas.experiments.validation import value_mse
    from vas.experiments.value_heads import finished_labels
    from vas.value.model import ValueModel

    model = ValueModel.from_pretrained(directory)
    pad = load_tokenizer(EMBEDDED_MODEL).pad_token_id
    halfway = held_out_labels(None, [], None, None, halfway_json)
    return {"finished": value_mse(model, finished_labels(data, 0), pad)["explained"],
            "halfway": value_mse(model, halfway, pad)["explained"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=Path("runs/experiments/value-heads"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/next_head_state_target.json"))
    args = parser.parse_args()
    stage = next(p for p in (args.experiment.parent / "stages").iterdir() if (p / "samples").is_dir())
    baseline = next(p for p in stage.glob("value-positivity-next-*") if p.is_dir() and not p.name.endswith(".checkpoints"))
    config = json.loads((baseline / "vas_value_config.json").read_text())
    data = datasets.load_from_disk(str(stage / "samples"))
    start = time.perf_counter()
    data = data.add_column("expected", expected_embeddings(data))
    precompute = time.perf_counter() - start
    recipe = TrainConfig(backbone=EMBEDDED_MODEL, backbone_layers=config["num_layers"], head="next",
                         lora_rank=config["lora_rank"], lora_alpha=config["lora_alpha"])
    trained = args.out.with_suffix("")  # the value model, beside the JSON
    training.ValueTrainer, training.ValueCollator = StateTargetTrainer, StateCollator
    metrics = training.train_value_model(data, trained, recipe, tokenizer=load_tokenizer(EMBEDDED_MODEL), log=print)
    samples = data.remove_columns("expected")
    result = {"taken tokens only (the experiment's next head)": r2(baseline, samples, args.experiment / "halfway_labels.json"),
              "plus V(s_t) = Σ π0·Q": r2(trained, samples, args.experiment / "halfway_labels.json"),
              "precompute_seconds": precompute, "train_seconds": metrics["train_seconds"], "rows": len(data)}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
