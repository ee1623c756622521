"""The one error type users can cause; the CLI prints it on one line and exits non-zero."""


class PruneVidError(Exception):
    """A problem with the user's input (file, config, model name) that they can fix.

    The message says what is wrong and what to do; it never needs a traceback.
    """


# What to do about the file-system errors a user can cause (a full disk, a read-only or foreign
# folder); any other OSError is a bug or a system fault and keeps its traceback.
_OS_ADVICE = {
    "ENOSPC": "the disk is full: free some space, then rerun the same command (finished samples are kept)",
    "EDQUOT": "the disk quota is used up: free some space, then rerun the same command (finished samples are kept)",
    "EROFS": "the file system is read-only: pass a writable folder (--results-dir, --out)",
    "EACCES": "permission denied: pass a folder you can write to (--results-dir, --out)",
    "EPERM": "operation not permitted: pass a folder you can write to (--results-dir, --out)",
    "ENOTDIR": "part of this path is a file, not a folder: pass another folder (--results-dir, --out)",
}


def describe_os_error(exc: OSError) -> str | None:
    """One line for a file-system error the user can fix, or None for any other OSError."""
    import errno

    name = errno.errorcode.get(exc.errno or -1)
    if name not in _OS_ADVICE:
        return None
    return f"{exc.filename or 'writing the results'}: {_OS_ADVICE[name]}"
