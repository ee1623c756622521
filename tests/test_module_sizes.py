"""No library file grows past 400 lines (issue 22): a long module is split by responsibility."""

from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "prunevid_bench"
LIMIT = 400


def test_no_library_file_is_over_400_lines():
    sizes = {path.relative_to(SOURCE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in SOURCE.rglob("*.py")}
    assert len(sizes) > 50  # the package was found
    over = {name: n for name, n in sizes.items() if n > LIMIT}
    assert not over, f"split these by responsibility (at most {LIMIT} lines each): {over}"
