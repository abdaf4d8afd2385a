"""The progress bar's rate: shown from the first update (a one-batch eval has no other), and after the end."""

import time

from pipeline.progress import _Rate, rate_bar


def test_the_rate_is_the_mean_until_rich_has_an_estimate():
    rate = _Rate("images")
    with rate_bar("eval", "images", enabled=False) as bar:
        task_id = bar.add_task("eval", total=500)
        task = bar.tasks[0]
        assert str(rate.render(task)) == "- images/s"  # nothing done yet: no number, not "0"
        time.sleep(0.05)
        bar.advance(task_id, 250)  # one update: rich's own speed is still None
        assert task.speed is None
        shown = float(str(rate.render(task)).split()[0].replace(",", ""))
        assert 250 / task.elapsed * 0.5 < shown <= 250 / 0.05
        bar.advance(task_id, 250)
        assert str(rate.render(task)) != "0 images/s"


def test_a_file_or_pipe_gets_whole_lines():
    import os
    import re
    import subprocess
    import sys

    # A real process whose stdout and stderr are files (no terminal), as `clipcoco ... 2> log` makes them.
    long_path = "/".join(["a-rather-long-folder-name"] * 8) + "/shards-val2017"
    script = ("from pipeline.progress import console, rate_bar, rule\n"
              "rule(console(stderr=True), '[1/9] shards')\n"
              f"console().print('packed 79 images -> {long_path}')\n"
              f"console(stderr=True).print('wrote {long_path}: 400 captions')\n"
              f"with rate_bar('embedding {long_path}', 'captions') as bar:\n"
              "    bar.add_task('x', total=10, completed=10)\n")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # an explicit width is obeyed
    # FORCE_COLOR (colours in a CI log) makes rich call a pipe a terminal: the lines must stay whole all the same.
    coloured = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**env, "FORCE_COLOR": "1"})
    assert f"{long_path}: 400 captions" in re.sub(r"\x1b\[[0-9;]*m", "", coloured.stderr)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert proc.stdout == f"packed 79 images -> {long_path}\n"
    header, *lines = proc.stderr.splitlines()
    assert len(header) == 80 and " [1/9] shards " in header  # a rule is not a whole line of 10,000 columns
    assert lines[0] == f"wrote {long_path}: 400 captions"
    assert len(lines) == 2 and lines[1].startswith(f"embedding {long_path} ") and "10/10" in lines[1]
