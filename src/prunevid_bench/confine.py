"""Confinement of the files a data file names: a dataset's or a stream dataset's rows stay inside
their video root, a ``--messages`` file's media inside its own folder, unless
``--allow-outside-root`` says otherwise. The path is resolved first (``..`` collapsed, symlinks
followed), so neither ``../`` nor an absolute path nor a link out of the root gets through: a
third-party data file cannot make the tool open (and hand to FFmpeg's demuxers) whatever file
it names."""

from __future__ import annotations

from pathlib import Path

ALLOW_FLAG = "--allow-outside-root"


def outside(path: str | Path, root: str | Path) -> Path | None:
    """``path`` resolved, when it lies outside ``root`` (resolved too); None when inside."""
    try:
        real = Path(path).expanduser().resolve()
        base = Path(root).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: whoever opens it says so
        return None
    return None if real == base or real.is_relative_to(base) else real


def refusal(what: str, real: Path, root: str | Path, root_name: str) -> str:
    """The one line that refuses ``what`` (``video ../x.mp4``) for lying outside ``root``."""
    return (f"{what} resolves to {real}, outside {root_name} {Path(root).expanduser().resolve()} "
            f"(symlinks followed); pass {ALLOW_FLAG} to read it")
