"""Packaging: the wheel ships the presets, and an install in another folder runs the demo on its own (not the
checkout); an editable install reads configs/ itself through the clip/configs link."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_demo import check_small_demo

REPO = Path(__file__).resolve().parents[1]
# What the build reads (pyproject.toml names README.md): copied, so building never writes build/ or an
# .egg-info into the checkout. copytree keeps clip/configs a link, as git checks it out.
PACKAGED = ("pyproject.toml", "README.md", "cli", "clip", "configs", "pipeline")
PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))

pytestmark = pytest.mark.slow


def copy_source(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in PACKAGED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, dest / name)
    return dest


def pip(*args: str) -> None:
    # --no-index: everything comes from the venv (setuptools builds without isolation); --target, never --prefix:
    # with --target pip ignores what the venv has installed, a --prefix install would uninstall the venv's clipcoco.
    subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet",
                    "--disable-pip-version-check"], check=True)


def outside_env(**extra: str) -> dict[str, str]:
    """The environment without the PYTHONPATH the suite may run under (the checkout)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = copy_source(tmp_path_factory.mktemp("wheel") / "source")
    out = source.parent / "dist"
    pip("wheel", "--no-build-isolation", "-w", str(out), str(source))  # a path: a bare name would be a PyPI project
    (built,) = out.glob("clipcoco-*.whl")
    return built


def test_wheel_holds_the_presets_as_files(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        presets = sorted(n.removeprefix("clip/configs/") for n in names if n.startswith("clip/configs/"))
        assert presets == PRESETS
        for name in PRESETS:  # the files' bytes, not a link
            assert whl.read(f"clip/configs/{name}") == (REPO / "configs" / name).read_bytes()
    assert not [n for n in names if n.startswith("configs/")]  # only inside the package


def test_installed_wheel_runs_the_demo_from_another_folder(wheel, tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    pip("install", "--target", str(site), str(wheel))
    cwd.mkdir()
    env = outside_env(PYTHONPATH=str(site))  # the venv's torch, DALI, transformers, text model; ours from site only
    where = subprocess.run(
        [sys.executable, "-c", "import json, sys, cli, clip, pipeline; print(json.dumps({'path': sys.path, "
         "'files': [m.__file__ for m in (cli, clip, pipeline)]}))"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True)
    found = json.loads(where.stdout)
    assert all(Path(f).is_relative_to(site) for f in found["files"]), found["files"]
    assert not any(p and Path(p).resolve() == REPO.resolve() for p in found["path"]), found["path"]

    out = tmp_path / "demo"
    proc = subprocess.run([str(site / "bin" / "clipcoco"), "demo", "--small", "--no-progress", "--out", str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paths"]["summary"] == str(out / "summary.json")
    assert "resnet18" in (out / "run" / "config.yaml").read_text()  # the demo preset, read from the install
    check_small_demo(out, proc.stdout + proc.stderr)  # and every stage did its work


def test_editable_install_reads_configs_through_the_link(tmp_path):
    source = copy_source(tmp_path / "source")
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    pip("install", "--no-build-isolation", "--target", str(site), "-e", str(source))
    cwd.mkdir()
    # -S: not the venv's site-packages (it holds an editable clipcoco of its own); the install's .pth is processed.
    read = ("import json, site, sys; site.addsitedir(sys.argv[1]); import clip; from clip.presets import "
            "read_config; print(json.dumps([clip.__file__, *read_config('demo')]))")

    def demo_preset() -> list[str]:
        proc = subprocess.run([sys.executable, "-S", "-c", read, str(site)], cwd=cwd, env=outside_env(),
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    clip_file, text, where = demo_preset()
    assert Path(clip_file) == source / "clip" / "__init__.py"
    assert text == (REPO / "configs" / "demo.yaml").read_text() and str(source / "clip" / "configs") in where
    with (source / "configs" / "demo.yaml").open("a") as preset:  # an edit of configs/ is what the install reads
        preset.write("# edited\n")
    assert demo_preset()[1].endswith("# edited\n")
