"""The `prunevid` app and what its commands share: exit codes, consoles, one-line errors (moved from cli.py).

Command modules (cli, cli_stream, cli_catalog) register on ``app`` here; cli imports them all and
owns ``main``, so importing prunevid_bench.cli registers every command."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from prunevid_bench.errors import PruneVidError, describe_os_error

# Exit codes, for scripts: named in --help (EXIT_HELP) and returned by run, sweep and compare.
EXIT_OK = 0  # every selected sample produced a parsed answer
EXIT_USAGE = 2  # a usage or input error: nothing was run (or a run stopped on an error it names)
EXIT_INCOMPLETE = 3  # the run finished, but some samples were skipped, errored or gave no parsed answer
EXIT_INTERRUPTED = 130
EXIT_HELP = (
    "Exit codes: 0 every selected sample gave a parsed answer; 3 finished, but samples were skipped, "
    "errored, unparsed or not evaluated (a rank died; summarize of an unfinished run); 2 usage or input error; 130 interrupted (rerun to resume)."
)

app = typer.Typer(
    name="prunevid",
    help="Benchmark PruneVid's visual-token reduction on Qwen2.5-VL: tokens, TTFT, memory, accuracy.",
    epilog=EXIT_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
presets_app = typer.Typer(help="List presets, or show one resolved.", invoke_without_command=True)
app.add_typer(presets_app, name="presets")
methods_app = typer.Typer(help="List the token-reduction methods, or show one's keys.", invoke_without_command=True)
app.add_typer(methods_app, name="methods")
console = Console()
err_console = Console(stderr=True)

def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    from prunevid_bench.terminal import printable

    # Messages quote ids, paths and texts from data files: escapes and markup stay inert.
    err_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from prunevid_bench import __version__

        typer.echo(f"prunevid-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Benchmark PruneVid's visual-token reduction on Qwen2.5-VL: tokens, TTFT, memory, accuracy."""


def quiet_libraries() -> None:
    """-q: transformers' and the Hub's progress bars ("Loading weights") and info messages too."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when imported
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    import sys

    if "transformers" in sys.modules:  # already imported (in-process callers): switch them off now
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging

        disable_progress_bars()
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def human_console(json_out: bool, quiet: bool) -> Console:
    """Where a command's text for people goes: stdout, stderr when stdout carries --json, or nowhere."""
    if quiet:
        quiet_libraries()
        return Console(quiet=True)
    return Console(stderr=True) if json_out else console


def emit_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


def finish(problems: list[str], human: Console) -> None:
    """Exit 3 when some selected samples got no parsed answer, saying why on stderr."""
    if problems:
        if not human.quiet:
            err_console.print(f"[yellow]incomplete:[/] {', '.join(problems)} (exit code {EXIT_INCOMPLETE})",
                              highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INCOMPLETE)


def guarded(fn):
    """Wrap a command so PruneVidError becomes a one-line error also under CliRunner."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PruneVidError as exc:
            fail(str(exc))
        except OSError as exc:  # a full or read-only disk: one line; other OSErrors are bugs
            message = describe_os_error(exc)
            if message is None:
                raise
            fail(message)
        except KeyboardInterrupt:
            fail("interrupted; finished samples are saved: rerun the same command to resume", EXIT_INTERRUPTED)

    return wrapper

