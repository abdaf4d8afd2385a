"""The `clipcoco` command-line tool: thin typer wrappers over the library functions.

Importing it first checks that `import clip` finds clipcoco's own `clip` package: OpenAI's CLIP is a top-level
`clip` too, and with it first on sys.path every command would fail deep inside with an AttributeError or an
ImportError. Instead the tool prints one line saying which `clip` it found and what to do, and exits 2.
"""

import importlib.util
import sys

# The --device rule of every command (pipeline/runtime.py applies it); kept here so `--help` imports no torch.
DEVICE_HELP = ("auto (a GPU when one is visible, else the CPU), cpu, cuda (this process's GPU: the one of its "
               "LOCAL_RANK under torchrun) or cuda:N.")


def _exit_unless_clip_is_ours() -> None:
    spec = importlib.util.find_spec("clip")
    try:
        import clip

        ours = vars(clip).get("DISTRIBUTION") == "clipcoco"
    except ImportError:  # a foreign `clip` whose own dependencies are missing, or none at all
        ours = False
    if not ours:
        where = "nothing" if spec is None else spec.origin or ", ".join(spec.submodule_search_locations or ())
        sys.stderr.write(f"error: `import clip` finds {where}, not clipcoco's own `clip` package (OpenAI's CLIP "
                         "installs a top-level `clip` too): uninstall that one (pip uninstall openai-clip, or clip "
                         "if installed from github.com/openai/CLIP) and reinstall clipcoco, or install clipcoco in "
                         "a separate venv\n")
        sys.exit(2)


_exit_unless_clip_is_ours()
