"""pipelines/core/progress.py: one line per interval in a log, one redrawn line on a terminal."""

from __future__ import annotations

import io
import sys

from pipelines.core.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_mode_writes_one_line_per_interval_and_a_final_line():
    clock, out = FakeClock(), io.StringIO()
    with Progress(1000, what="images", desc="sample", interval_s=30, stream=out, clock=clock) as p:
        assert not p.tty
        for _ in range(100):  # 10 images a second for 100 s
            clock.t += 1
            p.update(10)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == ["sample: 300/1000 images (30.0%), 10 images/s, ETA 1m10s",
                     "sample: 600/1000 images (60.0%), 10 images/s, ETA 40s",
                     "sample: 900/1000 images (90.0%), 10 images/s, ETA 10s",
                     "sample: 1000/1000 images in 1m40s, 10 images/s"]


def test_short_step_gives_only_the_final_line_and_close_is_idempotent():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(50, what="images", stream=out, clock=clock)
    clock.t += 5
    p.set(50)
    p.close()
    p.close()
    assert out.getvalue() == "50/50 images in 5s, 10 images/s\n"


def test_training_resumed_rate_counts_this_launch_only():
    clock, out = FakeClock(), io.StringIO()
    p = Progress(10_000, what="steps", desc="pretrain", interval_s=60, initial=4000, stream=out, clock=clock)
    clock.t += 60
    p.set(4600)  # a training loop reports its global step
    assert out.getvalue() == "pretrain: 4600/10000 steps (46.0%), 10 steps/s, ETA 9m00s\n"
    clock.t += 3600
    p.set(10_000)
    p.close()
    assert out.getvalue().splitlines()[-1] == "pretrain: 10000/10000 steps in 1h01m, 1.64 steps/s"


def test_unknown_total():
    clock, out = FakeClock(), io.StringIO()
    with Progress(None, what="files", interval_s=10, stream=out, clock=clock) as p:
        clock.t += 10
        p.update(25)
    assert out.getvalue().splitlines() == ["25 files, 2.5 files/s", "25 files in 10s, 2.5 files/s"]


def test_terminal_mode_redraws_one_line_with_tqdm():
    out = Terminal()
    with Progress(200, what="images", desc="encode", stream=out) as p:
        assert p.tty and p._bar is not None
        p._bar.mininterval = 0  # redraw on every update
        for _ in range(200):
            p.update(1)
    text = out.getvalue()
    assert text.count("\r") > 10
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "encode" in text and "200/200" in text and "images/s" in text


def test_terminal_mode_without_tqdm_redraws_its_own_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    clock, out = FakeClock(), Terminal()
    with Progress(100, what="images", stream=out, clock=clock) as p:
        assert p._bar is None
        for _ in range(10):
            clock.t += 1
            p.update(10)
    text = out.getvalue()
    assert text.count("\r") == 11 and text.count("\n") == 1
    assert text.endswith("\r100/100 images in 10s, 10 images/s\n")


def test_other_lines_leave_the_progress_line_whole():
    clock, out, rows = FakeClock(), io.StringIO(), io.StringIO()
    with Progress(100, what="steps", interval_s=30, stream=out, clock=clock) as p:  # a log: plain lines
        p.write("step=10 loss=1.0", stream=rows)
    assert rows.getvalue() == "step=10 loss=1.0\n" and out.getvalue().count("\n") == 1

    screen = Terminal()  # a terminal, without tqdm's bar: clear the line, write, redraw it
    p = Progress(100, what="steps", stream=screen, clock=clock, tty=True)
    p._bar = None
    clock.t += 10
    p.set(50)
    p.write("step=50 loss=0.5", stream=screen)
    assert screen.getvalue().endswith("\r\033[Kstep=50 loss=0.5\n50/100 steps (50.0%), 5 steps/s, ETA 10s")

    term = Terminal()  # with tqdm: the row lands on a line of its own, the bar is redrawn after it
    with Progress(100, what="steps", desc="pretrain", stream=term) as p:
        p.update(50)
        p.write("step=50 loss=0.5", stream=term)
    cleared, row, bar = term.getvalue().split("\r")[-4:-1]  # the bar, blanked; the row; the bar again
    assert cleared.strip() == "" and row == "step=50 loss=0.5\n" and "50/100" in bar


def test_ray_data_progress_bars_only_on_a_terminal(monkeypatch):
    from ray.data import DataContext

    from pipelines.core.ray_runtime import quiet_data_progress

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(sys, "stderr", Terminal())
    quiet_data_progress()
    assert ctx.enable_progress_bars  # a terminal keeps Ray Data's bars
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    quiet_data_progress()
    assert not ctx.enable_progress_bars  # a log would get a block of lines every few seconds


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 61, 3599, 3600, 7322)] == ["0s", "42s", "1m01s", "59m59s",
                                                                         "1h00m", "2h02m"]
