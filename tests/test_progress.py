"""tsalign.progress: the plain lines printed when output is not a terminal (format, rate limit, ETA),
driven by a fake clock; bars on a terminal; TSALIGN_PROGRESS overrides."""

from __future__ import annotations

import io

import pytest

from tsalign.progress import BarProgress, LineProgress, NoProgress, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("TSALIGN_PROGRESS", raising=False)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_line_format_has_done_total_rate_eta_and_postfix():
    out, clock = io.StringIO(), FakeClock()
    with progress(64, "generate", "prompt", stream=out, clock=clock) as bar:
        clock.now += 20
        bar.update(16, tok_s=95.24)
    first, *rest = lines(out)
    assert first == "[generate] 0/64 prompt (0%) | ? prompt/s | elapsed 00:00 | ETA ?"
    # 16 in 20 s = 0.8 prompt/s, shown as s/prompt; 48 left at that rate = 60 s
    assert rest[0] == "[generate] 16/64 prompt (25%) | 1.25 s/prompt | elapsed 00:20 | ETA 01:00 | tok_s=95.2"
    assert len(rest) == 1  # the closing line would repeat it: not printed


def test_lines_are_rate_limited_to_every_10_s_or_each_tenth():
    out, clock = io.StringIO(), FakeClock()
    with progress(1000, "score", "prompt", stream=out, clock=clock) as bar:
        for _ in range(99):  # 99 prompts, one a second: no tenth crossed, one line per 10 s
            clock.now += 1
            bar.update(1)
        assert len(lines(out)) == 1 + 9
        clock.now += 0.5
        bar.update(1)  # 100/1000: a tenth is crossed, printed although only 0.5 s passed
        assert lines(out)[-1].startswith("[score] 100/1000 prompt (10%) | ")
        bar.update(5)  # same second, same tenth: nothing
        assert len(lines(out)) == 11
    assert lines(out)[-1].startswith("[score] 105/1000 prompt (10%)")  # closing: the final count
    assert "ETA" in lines(out)[-1] and len(lines(out)) == 12


def test_resumed_work_counts_but_not_toward_the_rate_and_unknown_total():
    out, clock = io.StringIO(), FakeClock()
    with progress(100, "dpo", "step", initial=50, stream=out, clock=clock) as bar:
        clock.now += 10
        bar.update(25)
    assert lines(out)[0].startswith("[dpo] 50/100 step (50%)")
    assert lines(out)[-1] == "[dpo] 75/100 step (75%) | 2.5 step/s | elapsed 00:10 | ETA 00:10"
    out = io.StringIO()
    with progress(None, "teacher fit", "batch", stream=out, clock=clock) as bar:
        clock.now += 200
        bar.update(400)
    assert lines(out)[-1] == "[teacher fit] 400 batch | 2 batch/s | elapsed 03:20 | ETA ?"


def test_terminal_gets_a_bar_and_the_environment_overrides(monkeypatch):
    with progress(3, "x", stream=FakeTTY()) as bar:
        assert isinstance(bar, BarProgress)
        bar.update(1, loss=0.5)
    with progress(3, "x", stream=io.StringIO()) as bar:
        assert isinstance(bar, LineProgress)
    monkeypatch.setenv("TSALIGN_PROGRESS", "off")
    out = io.StringIO()
    with progress(3, "x", stream=out) as bar:
        assert isinstance(bar, NoProgress)
        bar.update(3)
    assert out.getvalue() == ""
    monkeypatch.setenv("TSALIGN_PROGRESS", "lines")
    with progress(3, "x", stream=FakeTTY()) as bar:
        assert isinstance(bar, LineProgress)


def test_lines_come_from_the_main_process_only(monkeypatch, capsys):
    """Under `accelerate launch` every process runs the stage: its lines and bars show once, not once per GPU."""
    import io

    from tsalign.progress import mode, say

    monkeypatch.delenv("TSALIGN_PROGRESS", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    say("[dpo] step 1/4")
    say("[tsalign] waiting for another process", every_process=True)
    assert capsys.readouterr().out == "[tsalign] waiting for another process\n"
    assert mode(io.StringIO()) == "off"
    monkeypatch.setenv("RANK", "0")
    say("[dpo] step 1/4")
    assert capsys.readouterr().out == "[dpo] step 1/4\n" and mode(io.StringIO()) == "lines"
