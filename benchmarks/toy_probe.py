"""Where a toy model keeps what its visual tokens show: a linear probe of each token's object
shape and colour at the input of every LLM layer (0 = the embeddings the vision tower hands over).

    PYTHONPATH=src python benchmarks/toy_probe.py --model toy8 [--world v2] [--n 300] [--seed 2000]
    PYTHONPATH=src python benchmarks/toy_probe.py --asset-dir /tmp/run/toy8 --world v2

The scenes are ``--n`` of the toy world ``--world`` drawn with ``--seed`` (training uses 1000, its
validation 999, the README's held-out sets 5, 7 and 11), prepared by the training code, so the
prompts, pixels and per-token labels are what training saw. Only the tokens an object covers are
probed (its label, ``toy.train_data.token_labels``). The probe is a multinomial logistic
regression (L-BFGS, L2 1e-3) fitted on the first half of those tokens and scored on the second,
on standardised features; chance is the most frequent class's share, printed beside it.

A probe that is high at layer 0 and stays high says the tower delivers the feature and the LLM
keeps it, so a question type that still fails is lost where the text reads the tokens; a probe
that is low at layer 0 says the tower never delivered it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def probe_accuracy(x, y, classes: int) -> float:
    """Held-out accuracy of a linear probe fitted on the first half of (x, y)."""
    import torch
    import torch.nn.functional as F

    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    half = x.shape[0] // 2
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x[:half] @ w + b, y[:half]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x[half:] @ w + b).argmax(1) == y[half:]).float().mean().item()


def toy_parser(description: str, n: int, seed: int, what: str) -> argparse.ArgumentParser:
    """The options every toy-model script here takes: which model, which world, how many of what."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=("toy", "toy8"), default="toy8", help="a shipped toy model")
    parser.add_argument("--asset-dir", type=Path, default=None, help="or a trained model's folder (config.json + model.safetensors)")
    parser.add_argument("--world", choices=("v1", "v2"), default="v2")
    parser.add_argument("--n", type=int, default=n, help=what)
    parser.add_argument("--seed", type=int, default=seed, help=f"toy-world seed of the {what}")
    return parser


def eager_toy_samples(args, tag: str):
    """(asset folder, model with eager attention, processor, codec, the "mc" samples of
    ``--n``/``--seed``/``--world``), prepared by the training code, on one torch thread."""
    import torch

    from prunevid_bench.config import RunConfig
    from prunevid_bench.models.loading import LoadedModel
    from prunevid_bench.pipeline import Pipeline
    from prunevid_bench.toy.model import ASSET_DIR, TOY8_DIR, load_toy_model
    from prunevid_bench.toy.train_data import PixelCodec, prepare_samples

    torch.set_num_threads(1)
    asset = args.asset_dir or (ASSET_DIR if args.model == "toy" else TOY8_DIR)
    model, processor = load_toy_model("eager", asset, world=args.world)
    pipe = Pipeline(LoadedModel(model, processor, "toy", video_policy="processor"), RunConfig())
    codec = PixelCodec(processor)
    samples = prepare_samples(pipe, codec, args.n, args.seed, tag, forms=("mc",), workers=1, world=args.world)
    return asset, model, processor, codec, samples


def main() -> None:
    args = toy_parser(__doc__.splitlines()[0], 300, 2000, "scenes").parse_args()

    import torch

    from prunevid_bench.toy.train_data import AUX_HEADS
    from prunevid_bench.toy.train_losses import collate

    asset, model, processor, codec, samples = eager_toy_samples(args, "probe")
    per_layer, labels = None, []
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            batch = [(s, "mc") for s in samples[i:i + 16]]
            inputs, _ = collate(batch, codec)
            hidden = model.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
            visual = inputs["mm_token_type_ids"] > 0
            rows = [h[visual].float() for h in hidden]
            per_layer = rows if per_layer is None else [torch.cat([a, b]) for a, b in zip(per_layer, rows)]
            labels.append(torch.cat([s.labels for s, _ in batch]))
    labels = torch.cat(labels)
    kinds = list(AUX_HEADS)
    print(f"{asset} on {args.n} scenes of world {args.world}, seed {args.seed}: {labels.shape[0]} visual tokens")
    for kind in ("shape", "colour"):
        y = labels[:, kinds.index(kind)]
        covered = y > 0
        accs = [probe_accuracy(x[covered], y[covered], AUX_HEADS[kind]) for x in per_layer]
        prior = torch.bincount(y[covered]).max().item() / int(covered.sum())
        print(f"{kind:>6} ({int(covered.sum())} covered tokens, chance {prior:.2f}), by layer input: "
              + " ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
