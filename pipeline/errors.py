"""The one exception type for a user's mistake (wrong path, mismatched inputs, missing extra), the one import
of an optional dependency (`require_extra`), whose absence is such a mistake, and `Interrupted`.

The CLI prints a `UserError`'s message without a traceback and exits 2 (`--debug` shows the traceback), and an
`Interrupted`'s message and exits 130; any other exception is an internal error and keeps its traceback.
"""

import sys
from types import ModuleType


class UserError(Exception):
    """A problem the user can fix; the message must say what to do next."""


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
