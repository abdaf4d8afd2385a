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
