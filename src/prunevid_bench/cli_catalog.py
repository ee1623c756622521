"""`prunevid presets`, `methods`, `toy-data` and `export-toy`: listings and the toy's files (moved from cli.py).

Registered on cli_base's ``app`` (and its presets/methods groups); no torch at import;
prunevid_bench.cli imports it where its commands belong in --help."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunevid_bench.cli_base import app, console, guarded, methods_app, presets_app


# ---------------------------------------------------------------- presets
@presets_app.callback()
@guarded
def presets(ctx: typer.Context) -> None:
    """List the presets with one line each: the method sections each switches on."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from prunevid_bench.config import build_config, load_yaml, preset_names, preset_path
    from prunevid_bench.methods import get_method

    table = Table(title="Presets", show_lines=False)
    for col in ("name", "methods on", "description"):
        table.add_column(col)
    for name in preset_names():
        sections = [get_method(m).section for m in build_config(name).enabled_methods]  # what --set names
        table.add_row(name, ", ".join(sections) or "none", str(load_yaml(preset_path(name)).get("description", "")))
    console.print(table)


@presets_app.command("show")
@guarded
def presets_show(name: Annotated[str, typer.Argument(help="Preset name.")]) -> None:
    """Print a preset's fully resolved config (defaults filled in) as YAML."""
    import yaml

    from prunevid_bench.config import build_config

    cfg = build_config(name)
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), highlight=False, end="")


# ---------------------------------------------------------------- methods
@methods_app.callback()
@guarded
def methods(ctx: typer.Context) -> None:
    """List the registered token-reduction methods, one line each: where it acts, its section and keys."""
    if ctx.invoked_subcommand is not None:
        return
    from prunevid_bench.methods import all_methods

    for m in all_methods():
        keys = ", ".join(k for k, *_ in m.keys())
        console.print(f"{m.name} [{'|'.join(m.places())}] {m.section}: {keys} - {m.summary}", highlight=False, markup=False, soft_wrap=True)


# How an LLM-layer method's layer resolves on a hybrid model (docs/methods.md, "Hybrid models").
HYBRID_LAYER = ("on hybrid models (Qwen3.5): K scores at a full-attention layer; a relative K ('10/28') moves down "
                "to the nearest full-attention layer at or below it (the shallowest if none), an absolute K on a "
                "linear-attention layer is refused naming the nearest; KV compaction shrinks the full-attention "
                "layers 0..K only, the linear layers 0..K keep the dropped tokens in their states; the record keeps "
                "the layer asked for (pruning_layer_requested) and the one used (pruning_layer)")


@methods_app.command("show")
@guarded
def methods_show(name: Annotated[str, typer.Argument(help="Method name (see `prunevid methods`).")]) -> None:
    """A method's keys with their types, defaults and allowed values; set them as SECTION.KEY."""
    from prunevid_bench.methods import get_method

    m = get_method(name)
    console.print(f"{m.name} ({'|'.join(m.places())}): {m.summary}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"departs from the original: {m.departs or 'not stated by the method'}", highlight=False, markup=False,
                  soft_wrap=True)
    console.print(f"section: {m.section} (e.g. --set {m.section}.enabled=true)", highlight=False, markup=False)
    for key, kind, default, allowed in m.keys():
        extra = f"  {allowed}" if allowed else ""
        console.print(f"  {m.section}.{key}: {kind} = {default!r}{extra}", highlight=False, markup=False, soft_wrap=True)
    if "llm_layer" in m.places():
        console.print(HYBRID_LAYER, highlight=False, markup=False, soft_wrap=True)
    if m.record_fields:
        console.print(f"record fields: {', '.join(m.record_fields)}", highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------- toy data
@app.command("toy-data")
@guarded
def toy_data(
    out: Annotated[Path, typer.Option("--out", help="Output folder (videos/ and data.jsonl).")],
    n: Annotated[int, typer.Option("--n", help="Number of questions.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (the toy model trained on seeds >= 1000).")] = 7,
    world: Annotated[str, typer.Option("--world", help="v1 (the original five types) or v2 (those and three question-guided types: busy scenes, one named object; docs/toy-model.md).")] = "v1",
) -> None:
    """Write synthetic toy-world videos and multiple-choice questions (our JSONL format)."""
    from prunevid_bench.toy.world import generate_dataset

    path = generate_dataset(out, n, seed, world=world)
    console.print(f"wrote {n} questions to {path}")


@app.command("export-toy")
@guarded
def export_toy(
    out: Annotated[Path, typer.Argument(help="New folder for the checkpoint.", show_default=False)],
) -> None:
    """Write the built-in toy model as a standard checkpoint folder (weights, config, tokenizer, processor)."""
    from prunevid_bench.toy.export import export_toy as write

    path = write(out)
    console.print(f"wrote the toy checkpoint to {path}; prunevid loads it with the toy's own video policy "
                  f"(processor: the frames the toy was trained on), as {path}/prunevid.json says; another tool "
                  "must sample the frames that way too, not Qwen's (which gives ~9x the tokens and random answers)",
                  soft_wrap=True, highlight=False)

