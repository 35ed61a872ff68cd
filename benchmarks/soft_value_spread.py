"""Why soft values steer less than the mean at the same β: the spread of each guide over π0's top-k candidates.

    python benchmarks/soft_value_spread.py VALUE_DIR SAMPLES_DIR [--states 32] [--top-k 10]

VALUE_DIR is a distributional value model (``vas train --head distributional``), SAMPLES_DIR the `vas collect`
folder it was trained on. The states are the first ``--states`` responses cut halfway. At each state s, for
π0's top-k tokens x (τ = 0.7), Eq. 5's guide adds β·V(s ⊕ x) to log π0; what steers is how much that term
differs between candidates. For each β the script prints, averaged over states, the standard deviation over
candidates of

* β·Q_β(s ⊕ x) = log Σ_i p_i·exp(β·z_i), the soft guide (:func:`vas.value.heads.soft_value`), and
* β·E_p[z], the mean guide,

and where the tilted distribution p_i·exp(β·z_i) puts its mass (on the top 5 atoms; its mean atom), with the
head's log-probability per atom and how much it varies between candidates, and the training rewards'
quantiles. β·Q_β's spread is bounded by the spread of log p over the top atoms as β grows, while β·E_p[z]'s
grows linearly.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import datasets
    import torch

    from vas.models import left_pad, load_policy, load_tokenizer
    from vas.value.model import ValueModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("value_dir")
    parser.add_argument("samples_dir")
    parser.add_argument("--states", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    value_model = ValueModel.from_pretrained(args.value_dir, dtype=torch.float32)
    if value_model.kind != "distributional":
        raise SystemExit(f"{args.value_dir} has the {value_model.kind} head: give a distributional value model")
    backbone = value_model.value_config["backbone"]
    tokenizer, policy = load_tokenizer(backbone), load_policy(backbone)
    data = datasets.load_from_disk(args.samples_dir)
    rows = data.select(range(min(args.states, len(data))))
    contexts = [list(p) + list(r)[: len(r) // 2] for p, r in zip(rows["prompt_ids"], rows["response_ids"])]
    S, k = len(contexts), args.top_k
    ids, mask = left_pad(contexts, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, -1].float() / args.temperature
        candidates = logits.log_softmax(-1).topk(k).indices
        sequences = [c + [int(x)] for c, row in zip(contexts, candidates) for x in row]
        prompt_lengths = torch.tensor([len(p) for p in rows["prompt_ids"] for _ in range(k)])
        ids, mask = left_pad(sequences, tokenizer.pad_token_id)
        outputs = value_model(ids, mask, prompt_lengths=prompt_lengths, head_outputs=True)[:, -1].float()
    log_p = outputs.log_softmax(-1).view(S, k, -1).double()
    z = value_model.support.double()
    mean = (log_p.exp() * z).sum(-1)
    rewards = torch.tensor(data["reward"], dtype=torch.float64)
    top = float(z[-5] - (z[1] - z[0]) / 2)
    print(f"{S} states × {k} candidates; {len(z)} atoms on [{float(z[0]):.3f}, {float(z[-1]):.3f}]")
    print("training rewards, quantiles 0/50/90/99/100 %:",
          " / ".join(f"{float(rewards.quantile(q)):.3f}" for q in (0.0, 0.5, 0.9, 0.99, 1.0)),
          f"; share in the top 5 atoms (≥ {top:.3f}): {float((rewards >= top).double().mean()):.2f}")
    print("head: log p per atom (every 5th, mean over states and candidates):",
          " ".join(f"{float(x):.2f}" for x in log_p.mean((0, 1))[::5]))
    print("head: s.d. over candidates of log p per atom (every 5th, mean over states):",
          " ".join(f"{float(x):.3f}" for x in log_p.std(1).mean(0)[::5]))
    print(f"head: p(top 5 atoms) per candidate, mean {float(log_p.exp()[..., -5:].sum(-1).mean()):.3f}")
    print("| β | s.d. of β·Q_β (soft) | s.d. of β·E[z] (mean) | tilted mass on the top 5 atoms | tilted mean atom |")
    print("|---|---|---|---|---|")
    for beta in (1, 2, 4, 8, 16, 32, 64):
        soft = torch.logsumexp(log_p + beta * z, dim=-1)
        tilted = (log_p + beta * z).softmax(-1)
        print(f"| {beta} | {float(soft.std(1).mean()):.3f} | {float((beta * mean).std(1).mean()):.3f} | "
              f"{float(tilted[..., -5:].sum(-1).mean()):.2f} | {float((tilted * z).sum(-1).mean()):.3f} |")


if __name__ == "__main__":
    main()
