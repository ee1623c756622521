"""`prunevid reproduce`: a published table (src/prunevid_bench/published/) run through our harness,
our numbers beside the published ones (harness.reproduce; --dry-run and --list: reproduce_plan).

Registered on cli_base's ``app``; no torch at import; prunevid_bench.cli imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunevid_bench.cli_base import app, emit_json, guarded, human_console
from prunevid_bench.cli_options import Attn, Device, Dtype, JsonOut, Quiet, ResultsDir, Threads
from prunevid_bench.errors import PruneVidError

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Another checkpoint than the table's (a Hugging Face id, a local folder, or a built-in name such as toy).", rich_help_panel="Model")]
Limit = Annotated[Optional[float], typer.Option("--limit", help="The first N questions of each benchmark file (a fraction when below 1): a smoke test; the published numbers are over every question.", show_default=False)]


@app.command()
@guarded
def reproduce(
    name: Annotated[Optional[str], typer.Argument(help="A published table (see --list), or a table YAML file.", show_default=False)] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="The folder holding the benchmarks as their releases unpack (--dry-run lists the files).")] = None,
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    attn_implementation: Attn = None,
    threads: Threads = None,
    limit: Limit = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would run and what it needs (weights, data, GPU hours); run nothing.")] = False,
    list_tables: Annotated[bool, typer.Option("--list", help="List the published tables.")] = False,
    results_dir: ResultsDir = Path("results"),
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Run a published table's methods at their budgets under its input setting; print ours beside theirs.

    Each benchmark file is a matched-budget sweep (resumable: rerun the command to continue).
    """
    human = human_console(json_out, quiet)
    if list_tables:
        if name is not None or dry_run:
            raise PruneVidError("--list lists every table; drop NAME and --dry-run")
        from prunevid_bench.harness.reproduce_plan import list_tables as show

        rows = show(human)
        if json_out:
            emit_json({"tables": rows})
        return
    if name is None:
        raise PruneVidError("name a published table (prunevid reproduce --list shows them)")
    if data_root is None and not dry_run:
        raise PruneVidError("a reproduction needs --data-root DIR (the folder holding the benchmarks; --dry-run lists the files)")
    overrides = {key: value for key, value in {"model.name": model, "model.device": device, "model.dtype": dtype,
                                               "model.attn_implementation": attn_implementation,
                                               "runtime.threads": threads}.items() if value is not None}
    from prunevid_bench.harness.reproduce import make_plan

    if dry_run:
        from prunevid_bench.harness.reproduce_plan import dry_run as plan_only

        result = plan_only(make_plan(name, data_root, overrides), human)
        if json_out:
            emit_json(result)
        return
    from prunevid_bench.harness.reproduce import reproduce as run
    from prunevid_bench.harness.specs import EvalOptions

    rows = run(name, data_root, EvalOptions(results_dir=results_dir), overrides=overrides, limit=limit, console=human)
    if json_out:
        emit_json({"rows": rows})
