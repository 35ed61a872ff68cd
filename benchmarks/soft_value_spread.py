"""Whether a distributional value model's soft values can steer: where they must equal the reward, and how much they
differ between π0's candidates.

    python benchmarks/soft_value_spread.py VALUE_DIR HELD_OUT_DIR [--responses 512] [--states 32] [--top-k 10]

VALUE_DIR is a distributional value model (``vas train --head distributional``), HELD_OUT_DIR a `vas collect` folder
of π0 responses it was not trained on. Two tables:

* **Finished responses.** A finished response's return is its reward, so its soft value Q_β must be the reward for
  every β. For the first ``--responses`` responses: the share of the rewards' variance that Q_β explains (R²), and
  the mean Q_β of the quarter with the lowest rewards and of the quarter with the highest, as vas computes Q_β
  (trimmed: :func:`vas.value.heads.soft_value`) and untrimmed (the exact soft value of the head's histogram). A
  soft value that tends to the same number for every response cannot tell a good response from a bad one.
* **Candidates.** At the first ``--states`` responses cut halfway, for π0's top-k tokens x (τ = 0.7), Eq. 5 adds
  β·V(s ⊕ x) to log π0: what steers is how much that term differs between candidates. The standard deviation over
  candidates, averaged over states, of β·Q_β(s ⊕ x) (trimmed and untrimmed) and of β·V(s ⊕ x), the mean guide.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BETAS = (1, 4, 8, 16, 32, 64, 128, 512)


def main() -> None:
    import datasets
    import torch

    from vas.models import left_pad, load_policy, load_tokenizer
    from vas.value.model import ValueModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("value_dir")
    parser.add_argument("held_out_dir")
    parser.add_argument("--responses", type=int, default=512)
    parser.add_argument("--states", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()

    value_model = ValueModel.from_pretrained(args.value_dir, dtype=torch.float32)
    if value_model.kind != "distributional":
        raise SystemExit(f"{args.value_dir} has the {value_model.kind} head: give a distributional value model")
    backbone = value_model.value_config["backbone"]
    tokenizer = load_tokenizer(backbone)
    data = datasets.load_from_disk(args.held_out_dir)

    @torch.no_grad()
    def head_outputs(sequences, prompt_lengths, batch_size=32):
        """The head's outputs at the last token of each sequence, (N, bins [+ 1]) float32."""
        outputs = []
        for i in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[i:i + batch_size], tokenizer.pad_token_id)
            lengths = torch.tensor(prompt_lengths[i:i + batch_size])
            outputs.append(value_model(ids, mask, prompt_lengths=lengths, head_outputs=True)[:, -1].float())
        return torch.cat(outputs)

    def untrimmed(outputs, beta):
        """The exact soft value of the histogram, moved like vas's (:meth:`ValueModel.values`)."""
        from vas.value.heads import soft_excess

        log_p = torch.log_softmax(value_model.histogram_logits(outputs).float(), dim=-1)
        return value_model.values(outputs) + soft_excess(log_p, value_model.support, beta, tail=0.0)

    rows = data.select(range(min(args.responses, len(data))))
    print(f"{value_model.name_or_path}: {len(value_model.support)} atoms on [{float(value_model.support[0]):.3f}, "
          f"{float(value_model.support[-1]):.3f}], point value: {'yes' if value_model.value_config.get('point_value') else 'no'}")
    outputs = head_outputs([list(p) + list(r) for p, r in zip(rows["prompt_ids"], rows["response_ids"])],
                           [len(p) for p in rows["prompt_ids"]])
    reward = torch.tensor(rows["reward"], dtype=torch.float32)
    order = reward.argsort()
    low, high = order[: len(order) // 4], order[-(len(order) // 4):]

    def r2(values):
        return float(1 - ((values - reward) ** 2).mean() / reward.var(unbiased=False))

    mean = value_model.values(outputs)
    print(f"\n{len(rows)} finished held-out responses: V explains {r2(mean):.0%}; rewards of the lowest quarter "
          f"{float(reward[low].mean()):.3f}, of the highest {float(reward[high].mean()):.3f}")
    print("| β | R² of Q_β (vas, trimmed) | R² untrimmed | Q_β lowest quarter → highest (vas) | untrimmed |")
    print("|---|---|---|---|---|")
    for beta in BETAS:
        soft, exact = value_model.values(outputs, float(beta)), untrimmed(outputs, float(beta))
        print(f"| {beta} | {r2(soft):.0%} | {r2(exact):.0%} | {float(soft[low].mean()):.3f} → {float(soft[high].mean()):.3f} | "
              f"{float(exact[low].mean()):.3f} → {float(exact[high].mean()):.3f} |")

    policy = load_policy(backbone)
    rows = data.select(range(min(args.states, len(data))))
    contexts = [list(p) + list(r)[: len(r) // 2] for p, r in zip(rows["prompt_ids"], rows["response_ids"])]
    S, k = len(contexts), args.top_k
    ids, mask = left_pad(contexts, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, -1].float() / args.temperature
    candidates = logits.log_softmax(-1).topk(k).indices
    outputs = head_outputs([c + [int(x)] for c, row in zip(contexts, candidates) for x in row],
                           [len(p) for p in rows["prompt_ids"] for _ in range(k)])
    print(f"\n{S} states halfway through held-out responses × π0's top {k} tokens: s.d. over candidates, mean over states")
    print("| β | β·Q_β (vas, trimmed) | β·Q_β untrimmed | β·V (mean guide) |")
    print("|---|---|---|---|")

    def spread(values):
        return float(values.view(S, k).std(1).mean())

    for beta in BETAS:
        print(f"| {beta} | {spread(beta * value_model.values(outputs, float(beta))):.3f} | "
              f"{spread(beta * untrimmed(outputs, float(beta))):.3f} | {spread(beta * value_model.values(outputs)):.3f} |")


if __name__ == "__main__":
    main()
