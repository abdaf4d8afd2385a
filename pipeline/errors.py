"""The one exception type for a user's mistake (wrong path, mismatched inputs, missing extra), the one rule that
turns a file-system error the user can fix (disk full, read-only, no permission, a path too long) into one, the one
import of an optional dependency (`require_extra`), whose absence is such a mistake, and `Interrupted`.

The CLI prints a `UserError`'s message without a traceback and exits 2 (`--debug` shows the traceback), and an
`Interrupted`'s message and exits 130 (0 under torchrun, which takes any other code for a failure); any other
exception is an internal error and keeps its traceback.
"""

import errno
import sys
from types import ModuleType

# What to do about the file-system errors a user fixes: space, permissions, another path.
_OS_ADVICE = {
    errno.ENOSPC: "free space on that disk or write somewhere else (another --out)",
    errno.EDQUOT: "free space within your quota or write somewhere else (another --out)",
    errno.EFBIG: "the file system or a limit on file size (ulimit -f) stops the file there: write somewhere else "
                 "(another --out) or raise the limit",
    errno.EROFS: "that file system is read-only: write somewhere else (another --out)",
    errno.EACCES: "check its permissions (and its folder's), or write somewhere else (another --out)",
    errno.EPERM: "check its permissions (and its folder's), or write somewhere else (another --out)",
    errno.ENAMETOOLONG: "a name in that path is too long for the file system: choose a shorter path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that is a folder: pass a file name",
    errno.EEXIST: "it exists and is not a folder: choose another path",
}


class UserError(Exception):
    """A problem the user can fix; the message must say what to do next."""


def os_error_message(err: OSError) -> str | None:
    """One line naming the file, the error and what to do, for an OSError the user can fix; None for any other."""
    advice = _OS_ADVICE.get(err.errno)
    if advice is None:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or errno.errorcode[err.errno]}: {advice}"


class Interrupted(Exception):
    """A stage stopped on SIGINT or SIGTERM after saving its work; the message says how to continue."""


def require_extra(module: str, extra: str, needed_for: str, *, otherwise: str = "") -> ModuleType:
    """Import `module`, which clipcoco's `extra` installs; a `UserError` naming that extra when it is missing or
    does not import. `otherwise` adds another way out (", or use `--loader torch`")."""
    try:
        __import__(module)  # the import statement's own hook, not importlib's: what an `import` would find
    except ImportError as err:
        state = "is not installed" if isinstance(err, ModuleNotFoundError) else f"does not import ({err})"
        raise UserError(f"{needed_for} needs {module}, which {state}: pip install 'clipcoco[{extra}]' "
                        f"(or `make install`){otherwise}") from err
    return sys.modules[module]
