"""No silent no-ops: a swept key whose values changed nothing is said, with the reason when known.

Cells that differ only in one swept key are compared question by question: the token counts
at every stage and the answer. When such a group of cells agrees on every question, the key had
no effect there (at those values of the other keys, or everywhere), and the sweep says so rather
than printing identical rows as if they were findings. The reason, where it can be told from the config and the records:

- a method's own reason, when it can tell one (``Method.no_effect``; e.g. PruneVid's cluster
  ratio, which clusters only sets larger than its minimum);
- a ``pruning_layer``: the values resolved to the same layer of this model.
- identical effective configurations (values that mean the same thing).
"""

from __future__ import annotations

from typing import Any

from prunevid_bench.report import record_get

# What a question's outcome is, for "no effect": token counts per stage and the answer.
OUTCOME = ("visual_tokens", "tokens_after_visual_methods", "visual_tokens_kept", "llm_prefill_tokens", "prediction",
           "generated_text")


def _outcomes(records: list[dict[str, Any]]) -> dict[str, tuple]:
    return {str(r["id"]): tuple(record_get(r, k) for k in OUTCOME) for r in records if not r.get("error")}


def _reason(key: str, cells: list, summaries: dict[str, dict[str, Any]]) -> str:
    from prunevid_bench.harness.sweep import short_name

    from prunevid_bench.methods import method_for_section

    section, _, name = key.partition(".")
    method = method_for_section(section)
    if method is not None and method.no_effect is not None:  # the method can tell why its key did nothing
        reason = method.no_effect(name, cells[0].config.section(section))
        if reason:
            return reason
    if name == "pruning_layer":
        layers = {summaries[c.name].get("pruning_layer") for c in cells}
        if len(layers) == 1:
            return f"the values resolve to the same layer of this model ({layers.pop()})"
    dicts = [c.config.to_dict() for c in cells]
    if all(d == dicts[0] for d in dicts):
        return "the cells' effective configurations are identical"
    return f"the same visual tokens and answers for every {short_name(key)} value on these questions"


def no_effect_notes(cells: list, results: dict[str, Any], spec: dict[str, list[Any]]) -> list[str]:
    """One line per swept key that changed nothing (``results``: cell name -> EvalResult)."""
    from prunevid_bench.harness.sweep import short_name

    grid = [c for c in cells if c.kind == "grid" and c.name in results]
    keys = [k for k in spec if "." in k]  # matched-budget sweeps have no config keys
    notes = []
    for key in keys:
        groups: dict[tuple, list] = {}
        for cell in grid:
            others = tuple(repr(cell.overrides.get(k)) for k in keys if k != key)
            groups.setdefault(others, []).append(cell)
        compared = [g for g in groups.values() if len({repr(c.overrides.get(key)) for c in g}) > 1]
        same = [g for g in compared
                if all(_outcomes(results[c.name].records) == _outcomes(results[g[0].name].records) for c in g)]
        if not same:
            continue
        summaries = {c.name: results[c.name].summary for c in grid}
        where = ""
        if len(same) < len(compared):  # only at some values of the other keys
            where = " at " + "; ".join(", ".join(f"{short_name(k)}={g[0].overrides.get(k)}" for k in keys if k != key)
                                       for g in same)
        notes.append(f"{short_name(key)} had no effect{where}: {_reason(key, same[0], summaries)}")
    return notes
