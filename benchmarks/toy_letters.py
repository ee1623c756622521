"""The toy models' letter step, per answer word: after the right answer word, is the letter right,
and where does the "answer" head (the one trained to read the answer's option) look?

    PYTHONPATH=src python benchmarks/toy_letters.py --model toy8 [--n 240] [--seed 11]
    PYTHONPATH=src python benchmarks/toy_letters.py --asset-dir /tmp/run/toy8

The questions are ``--n`` of the toy world ``--world`` drawn with ``--seed`` (11 is the README's
toy8 held-out set), prepared by the training code in the "mc" form and teacher-forced: the
answer word and then its letter are given, as `letter_accuracy` does in the training log. Per
answer word it prints how often the letter after it is right, and the answer head's mean
attention (from the position that predicts the letter) on the answer's option word, on all four
option words and on the visual tokens; then, for each wrong letter, that head's attention on
the four options and which one was the answer.

A wrong letter with the head on the right option says the option word's hidden state no longer
holds its letter; a wrong letter with the head on another option says the head mismatched the
word.
"""

from __future__ import annotations

from collections import defaultdict

from toy_probe import eager_toy_samples, toy_parser


def main() -> None:
    args = toy_parser(__doc__.splitlines()[0], 240, 11, "questions").parse_args()

    import torch

    from prunevid_bench.toy.train_losses import collate, guides_for
    from prunevid_bench.toy.world import LETTERS

    asset, model, processor, codec, samples = eager_toy_samples(args, "letters")
    layer, head = guides_for(model.config.text_config.num_hidden_layers)["answer"]
    tokenizer = processor.tokenizer
    by_word: dict[str, list[tuple[bool, float, float, float, list[float], int]]] = defaultdict(list)
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            batch = [(s, "mc") for s in samples[i:i + 16]]
            inputs, sup = collate(batch, codec)
            out = model.model(**inputs, use_cache=False, output_attentions=True)
            ids = inputs["input_ids"]
            rows = torch.arange(len(batch))
            at = sup.options.letter_at
            right = model.lm_head(out.last_hidden_state[rows, at]).argmax(-1) == ids[rows, at + 1]
            attention = out.attentions[layer][rows, head, at]  # [B, T]: from where the letter is predicted
            for b in range(len(batch)):
                word = tokenizer.decode([int(ids[b, sup.final[b] + 1])]).strip()
                options, answer, a = sup.options.positions[b], int(sup.options.correct[b]), attention[b]
                by_word[word].append((bool(right[b]), float(a[options[answer]]), float(a[options].sum()),
                                      float(a[sup.visual[b]].sum()), [float(a[p]) for p in options], answer))
    print(f"{asset} on {len(samples)} questions of world {args.world}, seed {args.seed}; "
          f"answer head: layer {layer}, head {head}")
    print(f"{'word':>9} {'letter right':>13} {'on answer':>10} {'on options':>11} {'on video':>9}")
    for word, rows in sorted(by_word.items()):
        n = len(rows)
        print(f"{word:>9} {sum(r[0] for r in rows):>6}/{n:<6} {sum(r[1] for r in rows) / n:>10.2f} "
              f"{sum(r[2] for r in rows) / n:>11.2f} {sum(r[3] for r in rows) / n:>9.2f}")
    for word, rows in sorted(by_word.items()):
        for r in rows:
            if not r[0]:
                print(f"  wrong letter after {word!r}: attention on options A-D "
                      + " ".join(f"{x:.2f}" for x in r[4]) + f", the answer is {LETTERS[r[5]]}")


if __name__ == "__main__":
    main()
