"""The ``prunevid verify`` command (registered on the CLI's app by ``cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prunevid_bench.cli_options import Attn, Device, Dtype, JsonOut, Model, Quiet
from prunevid_bench.errors import PruneVidError

EPILOG = "Exit codes: 0 every check that ran passed; 1 some check failed; 2 usage or input error."


def verify(
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    attn: Attn = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods to check (default: every registered one).")] = None,
    video: Annotated[Optional[Path], typer.Option("--video", help="A video of your own (default: a seeded synthetic 8-frame clip).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Greedy tokens compared per run.")] = 5,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Check, on your model, device, dtype, attention and transformers, that the patched model computes each
    method and nothing else: vanilla generate, nothing-to-reduce runs, a cache-free reference, attention scores.
    Default model: one built-in tiny model per family. Run it after installing or upgrading transformers."""
    from prunevid_bench.cli import emit_json, human_console
    from prunevid_bench.verify import render
    from prunevid_bench.verify import verify as run_checks

    if video is not None and not video.is_file():
        raise PruneVidError(f"--video {video}: no such file")
    human = human_console(json_out, quiet)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    reports = run_checks([model] if model else None, device=device or "auto", dtype=dtype or "float32",
                         attn=attn or "sdpa", methods=names, video=str(video) if video else None, n_tokens=tokens,
                         progress=lambda line: human.print(f"verifying {line}", highlight=False, markup=False))
    render(reports, human)
    if json_out:
        emit_json([r.to_dict() for r in reports])
    if any(r.failed for r in reports):
        raise typer.Exit(1)


def register(app: typer.Typer, guarded) -> None:
    app.command("verify", epilog=EPILOG)(guarded(verify))
