"""What ``loconet peer`` shows a person: a line when it joins, one per committed round, a summary, a live bar.

Where each goes (stdout stays machine-readable when ``--events`` asks for JSON)::

                     human lines (joined, rounds, summary)   live bar
    without --events stdout                                  stderr, when stderr is a terminal (or --progress)
    with --events    stderr                                  stderr, likewise

Lines are plain text when their stream is not a terminal (a pipe, a file) and
rich when it is; while the bar is drawn on the same terminal they are printed
above it. A value not known yet (no eval has run, no rate measured) is left
out of a line, or shown as "—" where the summary has a row for it: never
"nan". The formatting is pure functions of plain values (``round_line``,
``bar_info``, ``summary_lines``...), tested without processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

UNKNOWN = "—"
# Between the fields of a line: wide enough to read a column of round lines at a glance.
SEP = "  "


def known(value: float | None) -> bool:
    """Whether a figure has a value to show (not None, not NaN or infinite)."""
    return value is not None and math.isfinite(value)


def format_float(value: float | None, spec: str = ".3f") -> str:
    """The value in spec, or "—" when it is not known."""
    return format(value, spec) if known(value) else UNKNOWN


def format_bytes(n: int) -> str:
    """A byte count in decimal units: 812 B, 1.20 kB, 34.5 MB, 1.10 GB."""
    if n < 1000:
        return f"{n} B"
    unit, size = next((u, s) for u, s in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)) if n < s * 1000 or u == "GB")
    value = n / size
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """0.42 s, 12.3 s, 1m 23s, 2h 05m."""
    if not known(seconds):
        return UNKNOWN
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def steps_text(step: int, total: int | None) -> str:
    """150/1000, or 150 when the run is on a time budget."""
    return f"{step}/{total}" if total else str(step)


@dataclass(frozen=True)
class RoundFigures:
    """One committed round as the peer saw it."""

    round_id: int
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    bytes_sent: int
    wall_s: float
    # False: a round that went on without this peer, whose committed result it applied late.
    contributed: bool = True


def round_fields(r: RoundFigures) -> list[tuple[str, str]]:
    """(label, value) pairs of a round's line, leaving out what is not known."""
    fields = [("round", str(r.round_id)), ("step", steps_text(r.step, r.total_steps))]
    if known(r.loss):
        fields.append(("loss", f"{r.loss:.3f}"))
    if known(r.eval_loss):
        fields.append(("eval", f"{r.eval_loss:.3f}"))
    if r.contributed:
        fields.append(("sent", format_bytes(r.bytes_sent)))
        fields.append(("took", format_duration(r.wall_s)))
    else:
        fields.append(("applied late", "(went on without this peer)"))
    return fields


def render(fields: list[tuple[str, str]], markup: bool = False) -> str:
    """A line of label-value pairs; markup: with rich styles (the first label bold, the others dim)."""
    if not markup:
        return SEP.join(f"{label} {value}" for label, value in fields)
    (first_label, first_value), rest = fields[0], fields[1:]
    parts = [f"[bold]{escape(first_label)} {escape(first_value)}[/bold]"]
    parts += [f"[dim]{escape(label)}[/dim] {escape(value)}" for label, value in rest]
    return SEP.join(parts)


def round_line(r: RoundFigures, markup: bool = False) -> str:
    """The line printed for a committed round."""
    return render(round_fields(r), markup)


def bar_info(loss: float | None, eval_loss: float | None, steps_per_s: float | None, rounds: int, sent: int) -> str:
    """The live bar's figures, leaving out what is not known yet."""
    parts = []
    if known(loss):
        parts.append(f"loss {loss:.3f}")
    if known(eval_loss):
        parts.append(f"eval {eval_loss:.3f}")
    if known(steps_per_s):
        parts.append(f"{steps_per_s:.1f} it/s")
    parts.append(f"{rounds} round{'s' if rounds != 1 else ''}")
    parts.append(f"sent {format_bytes(sent)}")
    return " · ".join(parts)


def joined_line(run_id: str, peer: str, address: str, round_id: int, how: str, took_s: float) -> str:
    """The line printed once the peer is in the run; how: founded, fetched, resumed (see the daemon)."""
    return f"joined run {run_id} as {peer} at {address}: {how} (round {round_id}) in {format_duration(took_s)}"


@dataclass(frozen=True)
class Summary:
    """What a peer did, for the lines printed when it ends."""

    peer: str
    run_id: str
    # "finished", or "stopped (SIGTERM)" and the like.
    outcome: str
    steps: int
    total_steps: int | None
    rounds_committed: int
    rounds_missed: int
    eval_loss: float | None
    bytes_sent: int
    bytes_received: int
    bytes_served: int
    wall_s: float
    checkpoint_dir: str | None = None
    # Steps this process trained (None: unknown); fewer than steps when it resumed or skipped ahead to the run's step.
    trained_steps: int | None = None


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    """(label, value) rows of the summary, after its heading."""
    rounds = f"{s.rounds_committed} committed"
    if s.rounds_missed:
        rounds += f", {s.rounds_missed} without a commit"
    traffic = f"{format_bytes(s.bytes_sent)} sent, {format_bytes(s.bytes_received)} received"
    if s.bytes_served:
        traffic += f" ({format_bytes(s.bytes_served)} of state served to joiners)"
    rows = [("rounds", rounds), ("eval loss", format_float(s.eval_loss)), ("traffic", traffic)]
    if s.checkpoint_dir:
        rows.append(("checkpoints", s.checkpoint_dir))
    return rows


def summary_heading(s: Summary) -> str:
    """The summary's first line: who, what happened, how far, how long."""
    # The step count is the run's (a peer that resumed or skipped ahead to it did not train them all): probe K.
    here = f", {s.trained_steps} trained here" if s.trained_steps is not None and s.trained_steps != s.steps else ""
    return f"peer {s.peer} of run {s.run_id} {s.outcome}: {steps_text(s.steps, s.total_steps)} steps{here} in " \
           f"{format_duration(s.wall_s)}"


def summary_lines(s: Summary, markup: bool = False) -> list[str]:
    """The lines printed when the peer ends."""
    width = max(len(label) for label, _ in summary_rows(s))
    heading = summary_heading(s)
    rows = summary_rows(s)
    if markup:
        return [f"[bold]{escape(heading)}[/bold]"] + [
            f"  [dim]{label:<{width}}[/dim]  {escape(value)}" for label, value in rows
        ]
    return [heading] + [f"  {label:<{width}}  {value}" for label, value in rows]


def is_terminal(stream: TextIO) -> bool:
    """Whether stream is a terminal (False for anything without isatty, or closed)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def choose_streams(events: bool, progress: bool | None, stdout: TextIO, stderr: TextIO) -> tuple[TextIO, TextIO | None]:
    """(where human lines go, where the live bar goes or None): stdout carries only JSON when events are on."""
    human = stderr if events else stdout
    bar = progress if progress is not None else is_terminal(stderr)
    return human, (stderr if bar else None)


class PeerDisplay:
    """The peer's human output: lines on one stream (rich on a terminal), and a live bar on another (rich)."""

    def __init__(self, human: TextIO, bar: TextIO | None) -> None:
        self.human = human
        self._bar_stream = bar
        self._bar: Progress | None = None
        self._task = None
        # Rich when the human stream is a terminal; while the bar is drawn there, the bar's own console.
        self._own_console = Console(file=human, highlight=False, soft_wrap=True) if is_terminal(human) else None
        self._console = self._own_console

    def start_bar(self, total: int | None, step: int) -> None:
        """Start drawing the live bar (training begins)."""
        if self._bar_stream is None or self._bar is not None:
            return
        console = Console(file=self._bar_stream, highlight=False)
        # On a terminal the bar goes when training ends (the round lines and the summary stay);
        # elsewhere (--progress into a file) its last state is written once, at the end.
        self._bar = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            TextColumn("step {task.fields[steps]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=console.is_terminal,
            redirect_stdout=False,  # stdout may be the JSON events: nothing of the bar's may land there
            redirect_stderr=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("training", total=total, completed=step, steps=steps_text(step, total), info="")
        if self._own_console is not None and console.is_terminal:
            # The same terminal (in practice): lines go above the bar, or its redraw would overwrite them.
            self._console = console

    def update(self, step: int, total: int | None, info: str) -> None:
        """Redraw the bar with the latest figures (bar_info)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step, steps=steps_text(step, total), info=info)

    def stop_bar(self) -> None:
        """Stop drawing the bar (idempotent)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._console = self._own_console

    def line(self, plain: str, markup: str | None = None) -> None:
        """Print a line: markup (rich) on a terminal, plain otherwise."""
        if self._console is not None:
            self._console.print(markup if markup is not None else plain, markup=markup is not None)
            return
        self.human.write(plain + "\n")
        self.human.flush()

    def joined(self, text: str) -> None:
        """The peer is in the run."""
        self.line(text)

    def committed(self, r: RoundFigures) -> None:
        """A round committed."""
        self.line(round_line(r), round_line(r, markup=True))

    def summary(self, s: Summary) -> None:
        """The peer ends."""
        self.stop_bar()
        for plain, markup in zip(summary_lines(s), summary_lines(s, markup=True)):
            self.line(plain, markup)
