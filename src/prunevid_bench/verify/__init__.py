"""``prunevid verify``: the proofs of the test suite, run on the user's own model, device, dtype,
attention and transformers (``checks``: what is checked; ``reference``: the cache-free
reference and the tracer the tests use too).

:func:`verify` loads each model, prepares one short clip (a seeded synthetic one, or the user's
video), runs the baseline checks and every registered method's checks, and returns one
:class:`ModelReport` per model. Exit codes of the command: 0 every check that ran passed, 1 some
check failed, 2 bad input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

QUESTION = "What is happening in this video?"


def default_models() -> list[str]:
    """One built-in tiny model per family (``models.loading.BUILTIN``'s ``tiny*`` names)."""
    from prunevid_bench.models.loading import BUILTIN

    return [name for name in BUILTIN if name.startswith("tiny")]


def synthetic_clip(seed: int = 0):
    """8 seeded-random 112x112 frames whose top quarter is the same in every frame (static and
    dynamic tokens both, for the methods that tell them apart): the tests' clip."""
    import numpy as np

    frames = np.random.default_rng(seed).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    frames[:, :28] = frames[0, :28]
    return frames


@dataclass
class ModelReport:
    model: str
    family: str
    device: str
    dtype: str
    attn_implementation: str
    seconds: float = 0.0
    checks: list = field(default_factory=list)  # checks.Check

    @property
    def failed(self) -> list:
        return [c for c in self.checks if c.passed is False]

    def to_dict(self) -> dict:
        return {"model": self.model, "family": self.family, "device": self.device, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation, "seconds": round(self.seconds, 2),
                "passed": not self.failed, "checks": [c.to_dict() for c in self.checks]}


def verify(models: list[str] | None = None, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa",
           methods: list[str] | None = None, video=None, n_tokens: int = 5, progress=None) -> list[ModelReport]:
    """Run the checks on each model (default: one tiny model per family); ``methods`` limits the
    methods (default: every registered one)."""
    from prunevid_bench.errors import PruneVidError
    from prunevid_bench.families import family_of
    from prunevid_bench.methods import all_methods, get_method
    from prunevid_bench.pipeline import load_pipeline
    from prunevid_bench.verify.checks import Verifier
    from prunevid_bench.verify.inputs import inputs_check

    if n_tokens < 1:
        raise PruneVidError(f"--tokens must be >= 1, got {n_tokens}")
    chosen = [get_method(name) for name in methods] if methods else all_methods()
    reports = []
    for name in models or default_models():
        start = time.perf_counter()
        pipe = load_pipeline(name, device=device, dtype=dtype, attn_implementation=attn)
        model_dtype = str(pipe.model.dtype).removeprefix("torch.")
        report = ModelReport(name, family_of(pipe.model).model_type, str(pipe.model.device), model_dtype, attn)
        prepared = pipe.prepare(synthetic_clip() if video is None else video, QUESTION)
        verifier = Verifier(pipe, prepared, model_dtype, n_tokens)
        report.checks += verifier.baseline()
        report.checks.append(inputs_check(pipe, prepared, video))
        for method in chosen:
            if progress:
                progress(f"{name}: {method.name}")
            report.checks += verifier.method(method)
        report.checks += verifier.chunked(chosen)
        pipe.remove_stages()
        report.seconds = time.perf_counter() - start
        reports.append(report)
    return reports


def render(reports: list[ModelReport], console) -> None:
    """One rich table per model (check, method, max |Δ|, tolerance, result), within 80 columns,
    then each note on a line of its own."""
    from rich.markup import escape
    from rich.table import Table

    for rep in reports:
        table = Table(title=f"{rep.model} ({rep.family}, {rep.device}, {rep.dtype}, {rep.attn_implementation}, "
                            f"{rep.seconds:.0f} s)", title_justify="left")
        for col, kw in (("check", {}), ("method", {"overflow": "fold"}), ("max |Δ|", {"justify": "right"}),
                        ("tolerance", {"justify": "right"}), ("result", {})):
            table.add_column(col, **kw)
        notes = []
        for c in rep.checks:
            result = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]not run[/]"}[c.passed]
            if c.note:
                notes.append(f"{len(notes) + 1}. {c.check} {c.method}: {c.note}")
                result += f" ({len(notes)})"
            table.add_row(c.check, escape(c.method), "-" if c.diff is None else f"{c.diff:.2e}",
                          "-" if c.tol is None else f"{c.tol:.1e}", result)
        console.print(table)
        for line in notes:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        verdict = f"{len(rep.failed)} check(s) FAILED" if rep.failed else "every check that ran passed"
        console.print(f"{rep.model}: {verdict}", highlight=False)
