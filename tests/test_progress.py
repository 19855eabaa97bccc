"""Progress: a log line at most every interval when not on a terminal, nothing when quiet."""

import io

from conceptrank.progress import Progress, set_quiet, track


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_lines_at_most_every_interval_with_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    with Progress(100, "dissect: forward", "img", stream=out, interval=10, clock=clock) as p:
        for _ in range(40):
            clock.t += 1.0
            p.update(2)  # 2 img/s
    lines = out.getvalue().splitlines()
    # 40 s of work, one line per 10 s, plus the closing line
    assert len(lines) == 5
    assert lines[0] == "dissect: forward 20/100 img (20%), 2 img/s, ETA 0:00:40"
    assert lines[-1].startswith("dissect: forward 80/100 img (80%)") and lines[-1].endswith("done in 0:00:40")


def test_short_loops_print_nothing_and_unknown_totals_have_no_eta():
    clock, out = _Clock(), io.StringIO()
    with Progress(None, "scan", "file", stream=out, interval=10, clock=clock) as p:
        clock.t = 3
        p.update(6)
    assert out.getvalue() == ""
    assert p.line(now=3) == "scan 6 file, 2 file/s"


def test_quiet_silences_everything(monkeypatch):
    monkeypatch.delenv("CONCEPTRANK_QUIET", raising=False)
    clock, out = _Clock(), io.StringIO()
    set_quiet(True)
    try:
        with Progress(10, "x", stream=out, interval=1, clock=clock) as p:
            clock.t = 5
            p.update(5)
    finally:
        set_quiet(False)
    assert out.getvalue() == "" and p.count == 5


def test_track_yields_every_item():
    assert list(track(range(5), desc="t", enabled=False)) == [0, 1, 2, 3, 4]
