"""What a person reads at the end of ``loconet harness`` or ``loconet demo``: the report in a few lines."""

from __future__ import annotations


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def report_summary(report: dict, steps: int) -> str:
    """A short summary of a harness report (the JSON one has every figure)."""
    mb = report["bytes_sent_per_peer"] / 1e6
    dp = report["data_parallel_bytes_per_peer"] / 1e6
    floor = report.get("entropy_floor")
    lines = [
        "",
        "Summary",
        f"  eval loss      {_loss(report['initial_eval_loss'])} before -> {_loss(report['final_eval_loss'])} after"
        + (f" (best possible {floor:.3f})" if floor else ""),
        *([f"  accuracy       {report['final_accuracy']:.1%} (held out)"] if report.get("final_accuracy") is not None
          else []),
        f"  rounds         {report['rounds_committed']} committed, {report['rounds_aborted']} aborted",
        f"  sent per peer  {mb:.2f} MB; synchronous data-parallel would have sent {dp:.1f} MB "
        f"for the same {steps} steps ({_ratio(dp, mb)})" if mb else "  sent per peer  0 MB",
    ]
    for event in report.get("events", []):
        recovery, lost = event.get("recovery_s"), event.get("lost_s")
        after = f"next commit {recovery:.2f} s later" if recovery is not None else "no commit after it"
        if lost is not None:
            after += f", {lost:.2f} s lost"
        if "back_s" in event:
            target, back = event["target"], event["back_s"]
            after += (f"; {target} contributed again {back:.1f} s after it" if back is not None
                      else f"; {target} never contributed to a committed round again")
        lines.append(f"  event          {event['event']} at {event['time_s']:.1f} s; {after}")
    for peer, did in report.get("byzantine", {}).items():
        attacks = ", ".join(did["attacks"]) or "no attack (" + "; ".join(did["refused"]) + ")"
        lines.append(f"  byzantine      {peer}: {attacks}; {did['contributions_corrupted']} contributions corrupted, "
                     f"{did.get('corrupted_in_committed_rounds', 0)} in committed rounds")
    lines += [
        f"  peers          {report['peers_alive']} of {report['peers'] + report.get('joined', 0)} finished"
        + (("; " if report.get("left_behind") else " ") + _parameters(report) if report["peers_alive"] else ""),
        *(f"  crashed        {_exit(c)}" for c in report.get("crashed", [])),
        f"  wall time      {report['wall_s']:.0f} s; logs in {report['workdir']}",
    ]
    return "\n".join(lines)


def _ratio(dp: float, mb: float) -> str:
    """How data-parallel's bytes compare with ours: "188x more", or, for a method that sends more, "1.97x less"."""
    return f"{dp / mb:.0f}x more" if dp >= 1.5 * mb else f"{mb / dp:.2f}x less" if dp < mb else f"{dp / mb:.2f}x more"


def _exit(crash: dict) -> str:
    """'peer1 exited (1): its one-line error (log: path)'."""
    said = f": {crash['error']}" if crash.get("error") else ""
    return f"{crash['peer']} exited ({crash['exit_code']}){said} (log: {crash['log']})"


def crash_error(report: dict) -> str | None:
    """The one-line error of a run in which peer processes crashed (None when none did)."""
    crashed = report.get("crashed") or []
    if not crashed:
        return None
    more = f"; {len(crashed) - 1} more in the report" if len(crashed) > 1 else ""
    return f"{len(crashed)} peer process(es) exited with an error of their own: {_exit(crashed[0])}{more}"


def _parameters(report: dict) -> str:
    """How the survivors' parameters compare ("with ..."), and which survivors were left behind with parameters of
    their own (then the others are counted apart: "4 of 4 finished with identical parameters; peer0 left behind"
    said the opposite of itself)."""
    behind = report.get("left_behind") or []
    if not behind:
        return f"with {_compared(report)}"
    apart = (f"{', '.join(behind)} left behind (its syncs found nobody holding the run's state, the others gone: "
             "it trained on alone, with parameters of its own)")
    others = report["peers_alive"] - len(behind)
    if others <= 0:
        return f"with parameters of their own; {apart}"
    return f"{others} of them with {_compared(report, behind)}; {apart}"


def _compared(report: dict, behind: list[str] | tuple[str, ...] = ()) -> str:
    """Identical, or (rounds reduced in groups, as NoLoCo's) apart by design, or different (``behind``: survivors
    not compared)."""
    if report["survivors_identical"]:
        ends = {n: r for n, r in (report.get("last_round_per_peer") or {}).items() if n not in behind}
        at = report.get("identical_at_round")
        if at is not None and len(set(ends.values())) > 1:
            # Asynchronous rounds: the peers ended at different rounds, and were compared at the last all hold.
            low, high = min(ends.values()), max(ends.values())
            return f"identical parameters at round {at}, the last they all hold (they ended at rounds {low}-{high})"
        if at == 0:
            return (
                "identical parameters (the run's initial ones: no round committed, fewer steps than a sync interval?)"
            )
        return "identical parameters"
    spreads = report.get("spread_per_peer")
    if spreads is not None:
        # Each replica keeps weights of its own; how far apart they ended is the figure, not whether they are equal.
        apart = f", spread {max(spreads.values()):.3g} at the end" if spreads else ""
        return f"parameters of their own (averaged in groups of up to {report['largest_group']}){apart}"
    return "DIFFERENT parameters"


def interrupted_note(command: str, peers: int, workdir: str) -> str:
    """What Ctrl-C stopped, and where the logs of the stopped processes are."""
    return (
        f"\nloconet {command}: interrupted; stopped the coordinator and {peers} peer process(es). "
        f"Their logs are in {workdir}"
    )
