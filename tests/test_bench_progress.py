"""Benchmarks show progress on stderr: a live line on a terminal, one line per finished run elsewhere; stdout stays
the report alone."""

from __future__ import annotations

import io
import json
import re
import time

from peer.bench.progress import CLEAR_LINE, Progress
from peer.cli import main


def test_without_a_terminal_each_finished_run_is_one_plain_line():
    out = io.StringIO()
    with Progress("diloco", out=out, live=False) as progress:
        progress.begin("diloco [1/2]", lambda: "round 3, step 150/400")
        progress.end("eval loss 1.7600")
        progress.begin("one_peer [2/2]")
        progress.end()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"loconet bench diloco: diloco \[1/2\] done in \d+\.\d s \(eval loss 1\.7600\)", lines[0])
    assert re.fullmatch(r"loconet bench diloco: one_peer \[2/2\] done in \d+\.\d s", lines[1])
    assert "\r" not in out.getvalue()


def test_on_a_terminal_the_live_line_names_the_run_its_count_and_the_time_it_took():
    out = io.StringIO()
    with Progress("diloco", out=out, live=True, interval_s=0.05) as progress:
        progress.begin("streaming [2/4]", lambda: "round 3, step 150/400")
        time.sleep(0.3)  # a few redraws
        assert re.fullmatch(
            r"loconet bench diloco: streaming \[2/4\], round 3, step 150/400 \(\d+ s\)", progress.status()
        )
        progress.end()
    text = out.getvalue()
    redraws = re.findall(r"\r\x1b\[Kloconet bench diloco: streaming \[2/4\], round 3, step 150/400 \(\d+ s\)", text)
    assert len(redraws) >= 2
    assert re.search(r"\r\x1b\[Kloconet bench diloco: streaming \[2/4\] done in \d+\.\d s\n", text)
    assert text.endswith(CLEAR_LINE)  # closing leaves no half-drawn line behind


def test_a_failing_detail_does_not_break_the_benchmark():
    progress = Progress("x", out=io.StringIO(), live=True)
    progress.begin("run", lambda: 1 / 0)
    assert progress.status() == "loconet bench x: run (0 s)"
    progress.close()


def test_quiet_progress_writes_nothing():
    out = io.StringIO()
    with Progress("codecs", out=out, enabled=False) as progress:
        progress.begin("int8")
        progress.end("fast")
    assert out.getvalue() == ""


def test_bench_codecs_prints_only_the_report_on_stdout_and_a_line_per_codec_on_stderr(capsys):
    assert main(["bench", "codecs", "--numel", "2048", "--repeat", "1", "--codecs", "int8,fp16", "--json"]) == 0
    captured = capsys.readouterr()
    assert set(json.loads(captured.out)["codecs"]) == {"int8", "fp16"}  # one JSON object, nothing else
    lines = captured.err.splitlines()
    assert [line.split(" done in ")[0] for line in lines] == [
        "loconet bench codecs: int8", "loconet bench codecs: fp16",
    ]


def test_bench_codecs_with_q_is_silent_on_stderr(capsys):
    assert main(["bench", "codecs", "-q", "--numel", "2048", "--repeat", "1", "--codecs", "int8", "--json"]) == 0
    assert capsys.readouterr().err == ""
