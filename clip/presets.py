"""The training presets: the YAML files of the repository's `configs/` folder, shipped inside the package.

Input: what `--config` was given: a preset name (a file name of configs/ without `.yaml`, e.g. `coco-karpathy`)
or a path to a YAML file. Output: the file's text and a label saying where it came from.

    text, where = read_config("coco-karpathy")        # or read_config("my-runs/big.yaml"), read_config(Path(...))

`clip/configs` is a symlink to `../configs`, so configs/ stays the only copy of each preset: the checkout and an
editable install read configs/ through the link, and building a wheel copies the files through it into
`clip/configs/` (package data in pyproject.toml), so an installed clipcoco finds them wherever it is installed.
Imports nothing heavy: `clipcoco train --help` lists the names.
"""

from importlib.resources import files
from pathlib import Path

from pipeline.errors import UserError


def preset_names() -> list[str]:
    """The presets `--config` accepts by name, sorted."""
    folder = files("clip") / "configs"
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def is_preset_name(source: str | Path) -> bool:
    """A str without `/` or `.` names a preset; anything else is a path (`./demo` is the file called demo)."""
    return isinstance(source, str) and "/" not in source and "." not in source and source != ""


def read_config(source: str | Path) -> tuple[str, str]:
    """(YAML text, where it came from) of a preset name or a config file path."""
    names = ", ".join(preset_names())
    if is_preset_name(source):
        if source not in preset_names():
            raise UserError(f"no preset {source!r}: the presets are {names} (the files of configs/); "
                            "or pass a path to a YAML file")
        entry = files("clip") / "configs" / f"{source}.yaml"
        return entry.read_text(), f"preset {source} ({entry})"
    path = Path(source)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass a preset name ({names}: the files of configs/), "
                        "a path to a YAML file, or leave --config out")
    return path.read_text(), str(path)
