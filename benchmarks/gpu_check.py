"""One GPU check for a borrowed machine with no network: one command, at most 8 minutes on one
H100, everything from the working tree, on the torch and transformers the machine has (their
versions are recorded; nothing is installed).

    PYTHONPATH=src python benchmarks/gpu_check.py --device cuda --out gpu_check_report   # make gpu-check
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick                   # the CI smoke (< 3 min)

Steps (each with its own time limit; a step that would pass the overall budget is skipped and
says so; a failing step does not stop the others), run in the order 1, 3, 4, 5, 2: the paths that
never ran on a GPU first, the longest measurement last:

1. ``verify``: ``prunevid verify`` on every built-in tiny family (one per family, whatever families
   are registered) in float32 and bfloat16, sdpa and eager, and flash_attention_2 in bfloat16
   when ``flash_attn`` imports (``--quick``: float32/sdpa, and bfloat16/eager on the first family). This covers, on
   the device: vision-space Stage 1 (the merger hook), ToMe's proportional attention through the
   SDPA wrapper (and the mask path under eager), FastV, the merge control, EVS, VidCom2.
2. ``methods``: ``bench_methods.py`` on Qwen2.5-VL-7B's LLM shape (28 x 3584, 28/4 heads, MLP
   18944) at 8k and 16k visual tokens, every method, 2 timed rounds: TTFT against ideal, each
   method's own share, peak memory per phase, KV bytes (``--quick``: its ``--smoke``).
3. ``feature_cache``: ``bench_feature_cache.py`` on the device: a 1 + 6 cell sweep with and
   without the vision-feature cache (the wall-time ratio).
4. ``stream``: ``bench_streaming.py``: a stream's ask TTFT against offline re-prefill.
5. ``torchrun``: a one-rank ``torchrun`` dataset run (toy questions, the trained ``toy`` model: every
   answer parses, so the run exits 0).

Writes ``report.md`` and ``report.json`` to ``--out``; exit 0 when every step that ran passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # eight minutes
QWEN25_7B = ["--layers", "28", "--hidden", "3584", "--heads", "28", "--kv-heads", "4", "--intermediate", "18944"]


def versions(device: str) -> dict:
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": device, "cuda": torch.version.cuda,
           "flash_attn": None}
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn

            out["flash_attn"] = flash_attn.__version__
        except Exception as exc:  # noqa: BLE001 - importable on paper, broken in fact: recorded
            out["flash_attn_error"] = f"{type(exc).__name__}: {exc}"
    return out


def verify_matrix(device: str, quick: bool, has_flash: bool) -> list[tuple[str, str]]:
    if quick:
        return [("float32", "sdpa"), ("bfloat16", "eager")]
    matrix = [(dtype, attn) for dtype in ("float32", "bfloat16") for attn in ("sdpa", "eager")]
    return matrix + ([("bfloat16", "flash_attention_2")] if has_flash and device.startswith("cuda") else [])


def run_verify(device: str, dtype: str, attn: str, models: list[str] | None = None) -> dict:
    """``prunevid verify`` in this process (one CUDA start for the whole matrix)."""
    from prunevid_bench.verify import verify

    start = time.perf_counter()
    try:
        reports = verify(models, device=device, dtype=dtype, attn=attn)
    except Exception as exc:  # noqa: BLE001 - a crash on the device is a finding, recorded as such
        return {"status": "error", "seconds": time.perf_counter() - start, "error": f"{type(exc).__name__}: {exc}"}
    failed = [f"{r.model} {c.check} {c.method}" for r in reports for c in r.checks if c.passed is False]
    return {"status": "fail" if failed else "ok", "seconds": time.perf_counter() - start, "failed": failed,
            "reports": [r.to_dict() for r in reports]}


def run_command(name: str, command: list[str], timeout: float, env: dict) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, code, output = ("ok" if proc.returncode == 0 else "fail"), proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status, code = "timeout", None
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return {"status": status, "returncode": code, "seconds": time.perf_counter() - start,
            "command": " ".join(command), "output": output[-6000:]}


def commands(args, out: Path) -> list[tuple[str, list[str], float]]:
    """(step, command, time limit in seconds) of the benchmark steps."""
    py, dev = sys.executable, args.device
    data = out / "toy_questions"
    if args.quick:
        methods = [py, "benchmarks/bench_methods.py", "--smoke", "--device", dev]
        cache = [py, "benchmarks/bench_feature_cache.py", "--device", dev, "--questions", "2", "--rounds", "1",
                 "--frames", "4", "--size", "56", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2",
                 "--intermediate", "128", "--vision-depth", "1", "--vision-hidden", "64", "--threads", "1"]
        stream = [py, "benchmarks/bench_streaming.py", "--device", dev, "--chunks", "2", "--repeats", "1",
                  "--plot", str(out / "stream_kv.png"), "--plot-chunks", "2"]
        n_questions, limits = 4, (90, 90, 90, 120)
    else:
        methods = [py, "benchmarks/bench_methods.py", "--device", dev, "--dtype", "bfloat16", *QWEN25_7B,
                   "--tokens", "8192", "16384", "--repeats", "2", "--warmup", "1"]
        cache = [py, "benchmarks/bench_feature_cache.py", "--device", dev, "--questions", "20", "--rounds", "2"]
        stream = [py, "benchmarks/bench_streaming.py", "--device", dev, "--chunks", "4", "8", "16", "--repeats", "3",
                  "--plot", str(out / "stream_kv.png")]
        n_questions, limits = 10, (210, 60, 45, 45)
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "prunevid_bench",
                "run", "--dataset", str(data / "data.jsonl"), "--model", "toy", "--device", dev,
                "--results-dir", str(out / "runs"), "--limit", str(n_questions)]
    # the paths never run on a GPU first; the 7B-shape measurement (the longest) last
    return [("feature_cache", cache, limits[1]), ("stream", stream, limits[2]), ("torchrun", torchrun, limits[3]),
            ("methods", methods, limits[0])]


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = ["# GPU check", "", f"{report['started']} | {v.get('gpu', v['device'])} | torch {v['torch']} | "
             f"transformers {v['transformers']} | cuda {v['cuda']} | flash_attn {v['flash_attn']} | "
             f"{'quick' if report['quick'] else 'full'} | {report['seconds']:.0f} s in all", "",
             "| step | status | seconds |", "|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step.get('seconds', 0):.0f} |")
    for name, step in report["steps"].items():
        lines += ["", f"## {name}: {step['status']}", ""]
        if "reports" in step:
            lines += ["| model | dtype | attn | checks | failed | s |", "|---|---|---|---|---|---|"]
            for r in step["reports"]:
                failed = [f"{c['check']} {c['method']}" for c in r["checks"] if c["passed"] is False]
                lines.append(f"| {r['model']} | {r['dtype']} | {r['attn_implementation']} | {len(r['checks'])} | "
                             f"{', '.join(failed) or '-'} | {r['seconds']:.0f} |")
        for key in ("error", "reason", "command"):
            if step.get(key):
                lines.append(f"{key}: `{step[key]}`")
        if step.get("output"):
            lines += ["", "```", step["output"].strip()[-4000:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu (the dry run)")
    parser.add_argument("--quick", action="store_true", help="the reduced matrix (CI on the CPU)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_report")))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="overall time budget; later steps are skipped")
    parser.add_argument("--steps", nargs="+", default=None, help="a subset: verify methods feature_cache stream torchrun")
    args = parser.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "quick": args.quick,
              "versions": versions(args.device), "steps": {}}
    wanted = set(args.steps or ["verify", "methods", "feature_cache", "stream", "torchrun"])

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    if "verify" in wanted:
        for dtype, attn in verify_matrix(args.device, args.quick, report["versions"]["flash_attn"] is not None):
            name = f"verify {dtype} {attn}"
            print(f"[gpu_check] {name} ({left():.0f} s left)", flush=True)
            # --quick: the low-precision row on the first family only (CI time); the full check: every family
            from prunevid_bench.verify import default_models

            models = default_models()[:1] if args.quick and dtype != "float32" else None
            report["steps"][name] = run_verify(args.device, dtype, attn, models)
    if "torchrun" in wanted:
        from prunevid_bench.toy.world import generate_dataset

        generate_dataset(args.out / "toy_questions", 10, seed=3)
    for name, command, limit in commands(args, args.out):
        if name not in wanted:
            continue
        if left() < limit:
            report["steps"][name] = {"status": "skipped", "reason": f"{left():.0f} s of the budget left, needs up to {limit}"}
            continue
        print(f"[gpu_check] {name} ({left():.0f} s left)", flush=True)
        report["steps"][name] = run_command(name, command, limit, env)
    report["seconds"] = time.perf_counter() - start
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "report.md").write_text(markdown(report))
    bad = [name for name, step in report["steps"].items() if step["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] {report['seconds']:.0f} s; {'FAILED: ' + ', '.join(bad) if bad else 'every step that ran passed'}; "
          f"report in {args.out}/report.md", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
