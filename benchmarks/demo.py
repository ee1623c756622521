"""`make demo`: the bundled toy clip through the shipped toy model, unpruned and with PruneVid's
stages, in ONE process, alternating the two settings run by run.

Timed in two processes minutes apart, the two settings measure the machine as much as the
method (the vision encoder, which pruning does not touch, once went from 73 to 285 ms between
them). Here the model is loaded once, the clip is decoded once, both settings warm up, then each
repeat runs baseline and pruned back to back, so each pair sees the same load; the speed-up is
the median of the per-pair TTFT ratios, with its p25-p75, beside the ratio of the medians.

    PYTHONPATH=src python benchmarks/demo.py [--repeats 10] [--warmup 3] [--threads N]

Every column holds one statistic, named in its header: a median over the repeats, with p25-p75
where it fits. CPU time (process time, all threads) is printed beside wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.console import Console

from prunevid_bench.choices import LETTERS, format_mc_prompt, parse_choice
from prunevid_bench.config import PROJECT_ROOT, build_config
from prunevid_bench.harness.runs import spread
from prunevid_bench.harness.tables import Column, FittedTable

CLIP = PROJECT_ROOT / "examples" / "toy_sample.mp4"
QUESTION = "In which direction does the green circle move?"
OPTIONS = ["left", "down", "up", "right"]
ANSWER = "A"
SETTINGS = ("baseline", "default")  # presets: every stage off; the paper's stages


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def quartiles(values: list[float], fmt=ms) -> str:
    s = spread(values)
    return f"{fmt(s['median'])} ({fmt(s['p25'])}-{fmt(s['p75'])})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--model", default="toy")
    args = parser.parse_args(argv)
    console = Console()

    import torch

    from prunevid_bench.pipeline import Pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {name: build_config(name, None, {"model.name": args.model}) for name in SETTINGS}
    pipe = Pipeline.from_config(configs["baseline"])
    prepared = pipe.prepare(CLIP, format_mc_prompt(QUESTION, OPTIONS))
    for _ in range(args.warmup):
        for name in SETTINGS:
            pipe.run(prepared, config=configs[name])
    runs: dict[str, list] = {name: [] for name in SETTINGS}
    cpu = {name: 0.0 for name in SETTINGS}
    wall = {name: 0.0 for name in SETTINGS}
    for _ in range(args.repeats):
        for name in SETTINGS:  # back to back: each pair under the same load
            w, c = time.perf_counter(), time.process_time()
            runs[name].append(pipe.run(prepared, config=configs[name]))
            wall[name] += time.perf_counter() - w
            cpu[name] += time.process_time() - c

    rows = []
    for name in SETTINGS:
        results = runs[name]
        index, status = parse_choice(results[0].generated_text, len(OPTIONS), OPTIONS)
        letter = None if index is None else LETTERS[index]
        rows.append({"setting": name, "answer": f"{letter} {'correct' if letter == ANSWER else 'wrong'}" if letter
                     else f"none ({status}) wrong", "tokens": f"{results[0].tokens_before_stage1}→{results[0].visual_tokens_kept}",
                     "ttft": quartiles([r.ttft_s for r in results]),
                     "vision": ms(statistics.median(r.vision_encoder_s for r in results)),
                     "cost": f"{ms(wall[name] / args.repeats)}/{ms(cpu[name] / args.repeats)}"})
    columns = [Column("setting", lambda r: r["setting"], justify="left"),
               Column("answer", lambda r: r["answer"], fold=True, justify="left"),
               Column("tokens in→kept", lambda r: r["tokens"], fold=True),
               Column("TTFT ms median (p25-p75)", lambda r: r["ttft"], fold=True),
               Column("vision ms median", lambda r: r["vision"], rank=2),
               Column("wall/CPU ms mean", lambda r: r["cost"], rank=1, note="wall/CPU: per run, CPU time of all threads")]
    table = FittedTable(columns, rows, title=f"{args.model}: {Path(CLIP).name}, {args.repeats} alternating repeats after "
                                             f"{args.warmup} warm-ups (torch threads: {torch.get_num_threads()})")
    console.print(table)
    ratios = [b.ttft_s / d.ttft_s for b, d in zip(runs["baseline"], runs["default"])]
    of_medians = statistics.median(r.ttft_s for r in runs["baseline"]) / statistics.median(r.ttft_s for r in runs["default"])
    console.print(f"TTFT speed-up of default over baseline: median of the {len(ratios)} paired ratios "
                  f"{quartiles(ratios, lambda x: f'{x:.2f}×')}; ratio of the medians {of_medians:.2f}× "
                  f"(the answer is ({ANSWER}) {OPTIONS[0]})", highlight=False)


if __name__ == "__main__":
    from prunevid_bench.measure import wall_and_cpu_at_exit

    wall_and_cpu_at_exit("its speed-ups use wall-clock TTFTs (CPU time per run is in the table)")
    main()
