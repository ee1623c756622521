"""PruneVid is an ordinary method: no module outside ``methods/`` and ``stages/`` names its stages
(issue "Every method an equal..."). Generic code keys records, summaries and tables on places
(``visual_tokens``, ``tokens_after_visual_methods``, ``visual_tokens_kept``) and asks a method for
its own label, its lines of a method grid and its stream eviction."""

import re
from pathlib import Path

import prunevid_bench

PACKAGE = Path(prunevid_bench.__file__).parent
STAGE_NAME = re.compile(r"stage_?[12]|['\"]S[12]\b", re.IGNORECASE)

# The only lines allowed to name a stage outside methods/ and stages/, each with why.
ALLOWED = {
    # report.RECORD_ALIASES: the record's old field names (old -> new), written beside the new
    # ones for one release and read where an old run folder lacks the new ones.
    "report.py": {
        '"tokens_before_stage1": "visual_tokens",',
        '"tokens_after_stage1": "tokens_after_visual_methods",',
        '"stage2_tokens_before": "tokens_after_visual_methods",',
        '"stage2_tokens_after": "visual_tokens_kept",',
        '"stage1_s": "visual_methods_s",',
        '"stage2_s": "layer_method_s",',
    },
}


def stage_mentions(relative: str, text: str) -> list[str]:
    """``file:line: text`` of each line of ``text`` that names a stage and is not allowed."""
    allowed = ALLOWED.get(relative, set())
    return [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if STAGE_NAME.search(line) and line.strip() not in allowed]


def test_no_module_outside_methods_and_stages_names_prunevid_stages():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith(("methods/", "stages/")):
            continue
        found += stage_mentions(relative, path.read_text(encoding="utf-8"))
    assert not found, "stage names outside methods/ and stages/:\n" + "\n".join(found)


def test_the_scan_catches_a_stage_name():
    """The scan would catch what it guards against (a record key, a table label, a config key),
    and lets through only the allowlisted alias lines of their own file."""
    for line in ('tokens = run.metric("tokens_before_stage1")', "parts.append(f'S1 tau={tau}')",
                 'cfg["stage2"]["keep_ratio"]', "sections = ['Stage_1']", 'label = "S2"'):
        assert stage_mentions("harness/compare.py", line), line
    alias = '    "stage1_s": "visual_methods_s",'
    assert not stage_mentions("report.py", alias) and stage_mentions("harness/runs.py", alias)
    assert not stage_mentions("harness/compare.py", 'parts.append("tome budget=0.5")')
