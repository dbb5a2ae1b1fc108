"""The job console: each step's numbers travel from a Ray worker to the driver through the
progress feed, in order and once each, and print as one plain line per step in a log or as a
progress bar on a terminal. (`moeray jobs run` end to end, through the Ray Jobs API, is in
test_ray_jobs_api.py.)"""

import io

from moeray.jobs.console import ProgressFeed, StepPrinter, progress_line, publish

METRICS = {"loss": 1.23456, "lr": 3e-3, "tokens_per_s": 611.7, "eta_s": 27.2}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Collect(StepPrinter):
    def __init__(self):
        super().__init__(io.StringIO())
        self.shown = []

    def show(self, step, total, metrics):
        self.shown.append((step, total, metrics["loss"]))


def test_a_plain_line_per_step_names_step_of_total_loss_lr_throughput_and_eta():
    assert progress_line(3, 20, METRICS) == "moeray: step 3/20 loss 1.2346 lr 3.00e-03 tokens/s 612 eta 27s"
    evaluated = {**METRICS, "eval_loss": 0.5, "eval/gsm8k": 0.25, "eval/gsm8k_stderr": 0.1}
    assert progress_line(20, 20, evaluated).endswith("eval_loss 0.5000 eval/gsm8k 0.2500 eta 27s")
    log = io.StringIO()
    printer = StepPrinter(log)
    for step in (1, 2):
        printer.show(step, 2, METRICS)
    printer.close()
    assert log.getvalue().splitlines() == [progress_line(1, 2, METRICS), progress_line(2, 2, METRICS)]


def test_on_a_terminal_the_steps_draw_one_progress_bar():
    screen = Terminal()
    printer = StepPrinter(screen)
    for step in (1, 2, 3):
        printer.show(step, 4, {**METRICS, "loss": 1.0 / step})
    printer.close()
    drawn = screen.getvalue()
    assert "moeray: step" not in drawn  # a bar, not log lines
    assert "3/4" in drawn and "loss 0.3333" in drawn and "\r" in drawn


def test_steps_published_by_a_ray_worker_reach_the_driver_in_order(ray_session):
    feed = ProgressFeed()

    @ray_session.remote(num_cpus=0)
    class Worker:
        def __init__(self, queue):
            self.queue = queue

        def train(self, first, last, total):
            for step in range(first, last + 1):
                publish(self.queue, step, total, {**METRICS, "loss": float(step)})
            return last

    worker = Worker.remote(feed.queue)
    printer = Collect()
    with feed.following(printer):
        assert ray_session.get(worker.train.remote(1, 12, 12)) == 12
    assert printer.shown == [(step, 12, float(step)) for step in range(1, 13)]
    # The driver is done with the feed: a worker's late step is dropped, not an error.
    assert ray_session.get(worker.train.remote(13, 13, 12)) == 13
    publish(None, 1, 1, METRICS)
