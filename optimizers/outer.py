"""The base class of every algorithm that syncs pseudo-gradients: its torch.optim surface, rounds and their outcomes.

An algorithm (DiLoCo, Streaming DiLoCo, a plugin) subclasses ``OuterOptimizer``
and says three things: when a round is due (``_stepped``, called after each
inner step), which global parameters a round carries (``round_indices(tag)``),
and how much of the local side survives an outer step (``mix_alpha``). The
base class takes a round's outcome: on commit, the outer step on those
parameters and the mix into the model; on ``Resynced``, the run's state; on
``CaughtUp`` (the round went on without this peer), the committed results
applied in order, so the peer stays identical without a full state fetch; on
local divergence, a restart from the global state; on any other failure,
nothing (local progress is kept and the next sync tries again).

``step(closure=None, samples=1, *, loss=None)`` is torch.optim's ``step``
plus what only the caller knows: ``samples``, the examples the step trained
on (the batch size), which weigh this peer's pseudo-gradient in the next
round and are counted on the dashboard; and ``loss``, the step's training
loss (the closure's, when there is one). The base class reports both, with
the step count and steps per second, to the peer's ``status`` (what its
heartbeats carry to the coordinator's dashboard), when the peer has one.

Where the rest lives: an algorithm's config extends ``SyncConfig``
(``optimizers/syncconfig.py``); a round goes to its peer's ``sync`` or
``sync_async`` (the ``SyncPeer`` of ``optimizers/peers.py``: an
``ElasticCollective``, ``collectives/elastic.py``, or a ``LocalPeer``) from
``_send``; each sync's outcome is kept as a ``SyncRecord``
(``optimizers/syncrecord.py``); the inner and outer optimizers' hyperparameters
survive a checkpoint's load through ``optimizers/groupsettings.py``; the
reported steps per second are ``optimizers/steprate.py``'s; the global
parameters and outer state are ``GlobalState`` (``optimizers/globalstate.py``).
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from collectives.codecs import needs_feedback
from collectives.errors import ConfigError, Incompatible, LoconetError, NonFiniteError, UsageError
from collectives.membership.roundformat import reduction_parts
from collectives.notes import RepeatNote
from collectives.reduce.parts import unflatten_like
from collectives.statesync import StateSnapshot, state_digest
from collectives.syncphases import CaughtUp, Resynced
from optimizers.globalstate import GlobalState
from optimizers.groupsettings import group_settings, inner_kind_problem, keep_settings
from optimizers.peers import takes_keyword
from optimizers.statemeta import meta_str
from optimizers.steprate import StepRate
from optimizers.syncconfig import SyncConfig
from optimizers.syncrecord import RECENT_SYNCS, SyncRecord

log = logging.getLogger(__name__)


def warn_of_buffers(model: torch.nn.Module) -> None:
    """Log a warning when the model has floating-point buffers (BatchNorm's running statistics): rounds carry
    parameters only, so each peer keeps its own buffers and a joiner starts with freshly built ones."""
    names = [name for name, b in model.named_buffers() if b.is_floating_point()]
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        log.warning("the model has buffers (%s): rounds average its parameters only, so each peer keeps buffers "
                    "of its own (a joiner starts from freshly built ones); evaluate with statistics that do not "
                    "depend on them, or replace BatchNorm with GroupNorm or LayerNorm", shown)


class OuterOptimizer:
    """The torch.optim surface, the global state and the callbacks of an algorithm; subclasses schedule the rounds."""

    # Whether every peer holds the same state after a committed round: then its digest names the run's state,
    # which the coordinator records and joiners and resuming peers are checked against. False for algorithms
    # whose replicas differ by design (NoLoCo).
    REPLICAS_IDENTICAL = True
    # Whether a peer that was late for rounds (it fetched the state or their results) skips ahead to the run's
    # step: peers of a synchronous schedule that train at one speed otherwise stay one fetch behind for good,
    # reaching every sync after its round went on without them. Asynchronous rounds and federated clients keep
    # their own schedule.
    FOLLOWS_RUN_STEP = False
    # Whether a fresh peer's initial state is all a joiner would fetch before the run's first commit: the global
    # parameters and the outer state, with no schedule in the meta. Then a joiner whose initial state is the
    # founder's (the same seed) keeps it instead of fetching it (ElasticCollective.provide_state).
    INITIAL_STATE_IS_THE_RUNS = True

    def __init__(self, model: torch.nn.Module, inner: torch.optim.Optimizer, peer: Any, config: SyncConfig) -> None:
        self.model = model
        self.inner = inner
        self.peer = peer
        self.config = config
        self.state = GlobalState([(n, p) for n, p in model.named_parameters() if p.requires_grad], config.outer)
        warn_of_buffers(model)
        self.codec = config.codec_config
        self.aggregator = config.aggregator_config
        # Error feedback (sparse codecs, as in SparseLoCo): one residual per round tag (a fragment's, in Streaming
        # DiLoCo), allocated at its first round where the contribution is encoded. What a round did not carry of a
        # contribution is added to the next one; it moves on only with a committed round. It is this peer's own
        # (not the run's state): a resync keeps it, a restart begins without it.
        self._feedback = needs_feedback(self.codec)
        self._residuals: dict[str, torch.Tensor] = {}
        self.inner_steps = 0
        # Held while a round is applied and while a snapshot is taken, so a joiner's state never holds half of a
        # round (the parameters of round r with what a subclass keeps beside them, as of round r-1). Reentrant: a
        # subclass's snapshot holds it around the base's.
        self._applying = threading.RLock()
        # Examples trained on by this process (the status's ``samples``; the rounds' weights count their own).
        self.samples_trained = 0
        self._rate = StepRate()
        self.history: deque[SyncRecord] = deque(maxlen=RECENT_SYNCS)  # the recent syncs' records, oldest first
        # Every sync's outcome, counted: the history keeps only the recent ones.
        self.committed_rounds = 0
        self.syncs_missed = 0
        self._missed_notes = RepeatNote(log)
        # Called as a sync begins, after every committed round (progress displays, checkpoints)
        # and after every sync that did not commit (its record says why).
        self.on_sync_start: Callable[[int], None] | None = None
        self.on_commit: Callable[[SyncRecord], None] | None = None
        self.on_miss: Callable[[SyncRecord], None] | None = None
        # Replaces this peer's contribution before it is sent: the harness's byzantine attacks set it (a test
        # tool; an honest peer leaves it None).
        self.tamper: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        if hasattr(peer, "provide_state"):
            # Joiners fetch the run's state from this optimizer; late peers check round sizes against it.
            peer.provide_state(
                self.snapshot, round_numel=self.round_numel, state_nbytes=self._state_nbytes, digest=self.state_digest,
                initial_is_the_runs=self.INITIAL_STATE_IS_THE_RUNS, results_are_the_runs=self.REPLICAS_IDENTICAL,
                own_state=not self.REPLICAS_IDENTICAL, algorithm=self.algorithm_name, settings=self.run_settings,
            )

    # -- what a subclass says ---------------------------------------------------------

    def _stepped(self, samples: int) -> None:
        """An inner step trained on samples examples: count them, and run the rounds now due."""
        raise NotImplementedError(f"{type(self).__name__} must say when its rounds are due (_stepped)")

    def round_indices(self, tag: str) -> Sequence[int]:
        """Indices of the global parameters a round with this tag carries (ConfigError for a tag it never uses)."""
        raise NotImplementedError

    def mix_alpha(self) -> float:
        """How much of the local side survives an outer step (0: the local parameters restart from the global ones)."""
        return 0.0

    def _round_applied(self, tag: str) -> None:
        """A round with this tag was applied (the subclass advances its schedule)."""

    def _forget_local_progress(self) -> None:
        """Reset the subclass's count of local progress (samples since a sync) after a divergence."""

    def flush(self) -> None:
        """Finish a round still in flight (before evaluating, checkpointing or stopping); a no-op by default."""

    def sync_if_due(self) -> bool:
        """Run the sync the schedule says is due before any further step (a stop interrupted it, and this optimizer
        was resumed from the checkpoint taken then); whether a round committed. False by default: none is due."""
        return False

    def round_numel(self, tag: str) -> int:
        """Elements of a round with this tag (what a late peer expects to fetch)."""
        return sum(t.numel() for t in self._layout(tag))

    def _layout(self, tag: str) -> list[torch.Tensor]:
        """Tensors shaped as a round with this tag's value (its global parameters; a subclass may add some)."""
        return [self.state.globals[i] for i in self.round_indices(tag)]

    # -- torch.optim surface ------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        """The inner optimizer's parameter groups (so LR schedulers work)."""
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, like the inner optimizer."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        samples: int = 1,
        *,
        loss: torch.Tensor | float | None = None,
    ) -> torch.Tensor | None:
        """One inner step, then the rounds now due; returns the closure's loss (torch.optim's ``step``).

        ``samples``: examples this step trained on (the batch size, not ``len`` of an
        ``(x, y)`` pair). ``loss``: the step's training loss, for the peer's status;
        without it, the closure's.
        """
        try:
            samples = operator.index(samples)
        except TypeError:
            raise TypeError(f"samples counts the examples a step trained on (an int); got {samples!r}") from None
        if samples < 0:
            raise ValueError(f"samples counts the examples a step trained on; got {samples}")
        if closure is None:
            self._adjust_gradients()
            closure_loss = self._inner_step(self.inner.step)
        else:
            adjusted = self._adjusted(closure)
            closure_loss = self._inner_step(lambda: self.inner.step(adjusted))
        self.inner_steps += 1
        self.samples_trained += samples
        # Before the rounds: a blocking sync then shows this step, and the loss that led to it.
        self._report(closure_loss if loss is None else loss)
        self._stepped(samples)
        return closure_loss

    def _adjusted(self, closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The closure, followed by the algorithm's change to the gradients it computed."""

        def run() -> torch.Tensor:
            loss = closure()
            self._adjust_gradients()
            return loss

        return run

    def _adjust_gradients(self) -> None:
        """Change the gradients before the inner step (e.g. FedProx's proximal term); a no-op by default."""

    def _inner_step(self, step: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """Run the inner optimizer's step (``step``); an algorithm may change the move it makes (client momentum)."""
        return step()

    def _report(self, loss: torch.Tensor | float | None) -> None:
        """Put the step count, loss, samples and speed on the peer's status (its heartbeats carry them)."""
        status = getattr(self.peer, "status", None)
        if status is None:  # a LocalPeer, or any peer nobody watches: no device sync for the loss
            return
        status.step = self.inner_steps
        status.samples = self.samples_trained
        status.steps_per_s = self._rate.tick(time.monotonic())
        if loss is not None:
            status.loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        status.activity = "training"

    # -- rounds ---------------------------------------------------------------------------

    def contribution(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """This peer's contribution to a round carrying these parameters: their pseudo-gradients (a subclass may
        transform them, e.g. clip them), then the ``tamper`` hook if one is set."""
        tensors = self.state.pseudo_gradients(indices, on_device=self.encodes_on_device())
        return tensors if self.tamper is None else self.tamper(tensors)

    def encodes_on_device(self) -> bool:
        """Whether a round's contribution stays on the model's GPU, to be encoded there: when the codec shrinks it
        (anything but ``none``) and nothing runs on it on the host first (``prepare``, ``tamper``)."""
        return (
            self.state.transfers.uses_cuda
            and self.codec.name != "none"
            and self.tamper is None
            and self.prepare() is None
        )

    def prepare(self) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
        """A function of (round plan, flat contribution) run by the peer once each attempt's members are known
        (e.g. noise scaled to their number); None: the contribution is sent as it is."""
        return None

    def _send(self, tag: str, weight: Any, *, wait: bool, tensors: list[torch.Tensor] | None = None,
              **extra: Any) -> Any:
        """Start (wait=False: a future) or run (a result) the round of tag's pseudo-gradients (or of ``tensors``);
        ``extra`` goes to the peer's sync (``within``, ``own_state``)."""
        if tensors is None:
            tensors = self.contribution(self.round_indices(tag))
        call = self.peer.sync if wait else self.peer.sync_async
        prepare = self.prepare()
        # Only passed when used, so a user's SyncPeer without the argument keeps working where it is not needed.
        if prepare is not None:
            if not takes_keyword(call, "prepare"):
                method = getattr(call, "__name__", "sync")
                raise TypeError(
                    f"{type(self.peer).__name__}.{method}() takes no `prepare` argument, which "
                    f"{type(self).__name__} needs with these settings (it changes each attempt's contribution once "
                    "the members are known): add it as optimizers.peers.SyncPeer describes"
                )
            extra["prepare"] = prepare
        if self._feedback:  # passed only then, as prepare is: a user's SyncPeer need not take the argument
            extra["residual"] = self._residual(tag, tensors)
        least = self.round_minimum()
        # Passed only when it matters, as prepare is; a peer whose sync does not take it has its own membership.
        if least > 1 and takes_keyword(call, "min_members"):
            extra["min_members"] = least
        return call(tensors, weight=weight, tag=tag, codec=self.codec, aggregator=self.aggregator,
                    **self._settings_for(call), **extra)

    def _residual(self, tag: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """tag's error-feedback residual, as long as its contribution, where the contribution is encoded."""
        numel = sum(t.numel() for t in tensors)
        residual = self._residuals.get(tag)
        if residual is None or residual.numel() != numel:
            device = tensors[0].device if tensors else torch.device("cpu")
            residual = self._residuals[tag] = torch.zeros(numel, dtype=torch.float32, device=device)
        return residual

    def round_minimum(self) -> int:
        """The fewest members this algorithm's rounds may have, beyond what its aggregator needs: 1 (any)."""
        return 1

    def _settings_for(self, call: Callable[..., Any]) -> dict[str, tuple[str, ...]]:
        """The ``settings`` argument of a peer's sync, for a peer whose coordinator compares them (a peer whose
        sync does not take it, a LocalPeer or a user's own, has nobody to compare with)."""
        return {"settings": self.config.round_settings()} if takes_keyword(call, "settings") else {}

    def _sync_starts(self) -> None:
        if self.on_sync_start is not None:
            self.on_sync_start(self.inner_steps)

    def _conclude(
        self,
        result_of: Callable[[], Any],
        tag: str,
        *,
        started: float,
        label: str,
        missed: Callable[[], None] = lambda: None,
    ) -> bool:
        """Take a sync's outcome: on commit, the outer step on tag's parameters mixed in; record it either way.

        ``missed`` updates the subclass's schedule when nothing was applied. Returns whether
        this peer's round committed.
        """
        try:
            result = result_of()
        except Resynced as exc:
            self.load_snapshot(exc.snapshot)
            self._record(SyncRecord(self.inner_steps, False, exc.snapshot.round_id, reason="resynced from the run",
                                    resynced=True))
            return False
        except CaughtUp as exc:
            self._catch_up(exc)
            return False
        except NonFiniteError as exc:
            self._diverged(exc)
            return False
        except (Incompatible, UsageError):
            raise  # no round can commit with this peer (or the caller's code is wrong): training on would hide it
        except LoconetError as exc:
            # Inner progress is kept; the pseudo-gradient keeps growing until a round commits.
            # A peer left behind (nobody holds the run's state) misses every sync for the same reason: said
            # at once and then every 30 s, not at every step.
            self._missed_notes.note(str(exc), "%s did not commit (%s); training on locally", label, exc)
            missed()
            self._record(SyncRecord(self.inner_steps, False, reason=str(exc), error=type(exc).__name__))
            return False
        with self._applying:
            self._apply(tag, result.value, result.round_id)
        self._line_up(getattr(result, "members_step", 0))
        stats = getattr(result, "stats", None)
        self._record(
            SyncRecord(
                self.inner_steps,
                True,
                result.round_id,
                bytes_sent=getattr(stats, "bytes_sent", 0),
                wall_s=time.monotonic() - started,
                allreduce_s=getattr(stats, "wall_s", 0.0),
                epoch=getattr(result, "epoch", 0),
                decisions=list(getattr(result, "decisions", [])),
                **self._round_facts(),
            )
        )
        return True

    def _round_facts(self) -> dict[str, Any]:
        """What the subclass adds to a committed round's record (its staleness, its group's size); none by default."""
        return {}

    def _apply(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        """The outer step of a committed round on tag's parameters, mixed into the model."""
        indices = self.round_indices(tag)
        self.state.outer_step(indices, value, round_id, step=self.inner_steps)
        self.state.load_into_model(indices, alpha=self.mix_alpha())
        self._round_applied(tag)

    def _catch_up(self, exc: CaughtUp) -> None:
        """Apply the committed rounds this peer was late for, in order (its own contribution was not used)."""
        self._forget_local_progress()  # this sync's own contribution was not used
        for missed in exc.rounds:
            self._apply_late(missed, self._apply)
        self._follow_run_step(len(exc.rounds))

    def _follow_run_step(self, rounds_missed: int) -> None:
        """After the run went on ``rounds_missed`` rounds without this peer: skip ahead to where its up-to-date
        peers train (heartbeats), so that this peer's next sync is the run's; never past one interval after the
        run's last round (a synchronous run's members are never further: a heartbeat claiming more is not
        believed), nor more intervals than the rounds it missed (the coordinator's figure is its members' word)."""
        progress = getattr(self.peer, "run_progress", None)
        if not self.FOLLOWS_RUN_STEP or progress is None:
            return
        run_step, round_step = (int(v) for v in progress())
        every = self.config.sync_every
        target = min(run_step, round_step + every - 1, self.inner_steps + (rounds_missed + 1) * every)
        if target > self.inner_steps:
            into = max(0, target - round_step)  # 0: the run's round step was past belief, counted from here
            log.info("late for the run: skipping from step %d to the run's step %d (%d into its sync interval)",
                     self.inner_steps, target, into)
            self._skip_to(target, into)
        elif round_step <= self.inner_steps < round_step + every:
            # Already at the run's step (its heartbeats say no more): count this interval from the run's last round,
            # not from now, so the next sync is the run's. (A peer resumed with a sync due caught up a step late,
            # synced one step after the others for the rest of the run, and made one round more at its end.)
            self._skip_to(self.inner_steps, self.inner_steps - round_step)

    def _line_up(self, members_step: int) -> None:
        """After a committed round whose furthest member asked at ``members_step``: nothing by default (DiLoCo
        counts its steps up to it)."""

    def _skip_to(self, step: int, into_interval: int) -> None:
        """Continue from the run's step, ``into_interval`` steps after its last round (a schedule by step count
        needs only the step; one counting steps since its last sync also takes the interval)."""
        self.inner_steps = step

    def _apply_late(self, missed: Any, apply: Callable[[str, Sequence[torch.Tensor], int], None]) -> None:
        """Apply one committed round this peer was late for with ``apply(tag, value, round_id)``, and record it."""
        with self._applying:
            apply(missed.tag, unflatten_like(missed.value, self._layout(missed.tag)), missed.round_id)
        reason = f"late for round {missed.round_id}: applied its committed result from {missed.source}"
        self._record(
            SyncRecord(
                self.inner_steps, True, missed.round_id, reason=reason, contributed=False, epoch=missed.epoch,
                fetched_bytes=getattr(missed, "wire_bytes", 0),
            )
        )

    def _diverged(self, exc: NonFiniteError) -> None:
        """Local training went NaN/Inf: restart it from the global state, dropping the inner steps since.

        The run's state is intact (this peer's contribution was refused before it was
        sent), so one bad step costs this peer its local progress, not the run.
        """
        log.error(
            "local training diverged at step %d (%s); restarting it from the run's global state "
            "(lower the learning rate if this repeats)", self.inner_steps, exc,
        )
        self.state.load_into_model(range(len(self.state.params)))
        self.inner.state.clear()  # moments computed from NaN would poison the next steps
        self.inner.zero_grad(set_to_none=True)  # and so would NaN gradients left for the next step
        self._forget_local_progress()
        reason = f"local training diverged; restarted from the global state: {exc}"
        self._record(SyncRecord(self.inner_steps, False, reason=reason))

    def _record(self, record: SyncRecord) -> None:
        self.history.append(record)
        self.committed_rounds += record.committed
        self.syncs_missed += not record.committed
        if record.committed:
            self._state_changed()
        if record.committed and self.on_commit is not None:
            self.on_commit(record)
        elif not record.committed and self.on_miss is not None:
            self.on_miss(record)

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        """What the subclass adds to the state a joiner fetches."""
        return {}

    def _checked_meta(self, meta: dict) -> Callable[[], None]:
        """Check the subclass's part of a state's meta (its schedule; ConfigError if malformed) and return what
        takes it: nothing changes before it is called, so a refused state leaves this peer as it was."""
        return lambda: None

    def _taking_meta(self, meta: dict) -> Callable[[], None]:
        """Check a whole state's meta, its algorithm and then the subclass's part, and return what takes the
        subclass's part: every path that adopts a state goes through here before it changes anything."""
        self._check_algorithm(meta)
        return self._checked_meta(meta)

    def _state_nbytes(self) -> int:
        """The size of the state a joiner fetches (a subclass with more than the global state adds its part)."""
        return self.state.nbytes()

    def run_settings(self) -> tuple[str, ...]:
        """What the run's members must agree on, as a round format names it without the length: the codec, the
        aggregator and the config's ``round_settings`` (what a member does with a round's result)."""
        return (*reduction_parts(self.codec, self.aggregator), *self.config.round_settings())

    def algorithm_name(self) -> str:
        """The registered name of the algorithm this optimizer runs, as its states name it ("": none)."""
        return str(self._meta().get("algorithm", ""))

    def _check_algorithm(self, meta: dict, required: bool = False) -> None:
        """ConfigError when a state names another algorithm than this peer's: a run's peers must run the same one
        (a state without the name, as old checkpoints may be, is checked only when ``required``)."""
        theirs = meta_str(meta, "algorithm", "")
        mine = self.algorithm_name()
        if (theirs or required) and mine and theirs != mine:
            what = f"a {theirs[:40]!r} state" if theirs else "a state that names no algorithm"
            raise ConfigError(f"the run's state is {what} and this peer runs {mine!r}: every peer of a run must run "
                              "the same --algorithm")

    def snapshot(self) -> StateSnapshot:
        """The run's state as of the last committed round (what a joiner fetches), never half of a round."""
        with self._applying:
            return self.state.snapshot({"inner_steps": self.inner_steps, **self._meta()})

    @property
    def global_step(self) -> int:
        """The run's step count as this peer follows it: the training loop counts its steps from it."""
        return self.inner_steps

    def state_digest(self) -> tuple[int, str]:
        """(round id, SHA-256 hex of the state a joiner fetches), or (round id, "") when replicas differ by design."""
        if not self.REPLICAS_IDENTICAL:
            return self.state.round_id, ""
        snap = self.snapshot()
        return snap.round_id, state_digest(snap)

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state: global parameters, outer state, step count; the local parameters restart from them.
        ConfigError when the state does not fit this peer or is malformed: nothing changed then."""
        take_meta = self._taking_meta(snapshot.meta)
        self.state.restore(snapshot, into_model=True)
        # Count steps as the run does, so syncs and the end line up.
        self.inner_steps = max(self.inner_steps, self.state.step)
        self._forget_local_progress()
        take_meta()
        run_round = getattr(self.peer, "run_round", None)
        if run_round is not None and run_round() > snapshot.round_id:
            # Rounds committed while this state was fetched: the run went on without this peer. (Otherwise its
            # next round may be waiting for this peer: it then brings a whole interval of training to it.)
            self._follow_run_step(run_round() - snapshot.round_id)
        self._state_changed()

    def _state_changed(self) -> None:
        """Tell the peer the state moved to a new round, so it computes and reports the state's digest."""
        changed = getattr(self.peer, "state_changed", None)
        if changed is not None and self.REPLICAS_IDENTICAL:
            changed()

    def _counters(self) -> dict:
        """The subclass's counters that a restart needs (beyond the run's state)."""
        return {}

    def _load_counters(self, state: dict) -> None:
        """Restore what _counters returned."""

    def state_dict(self) -> dict:
        """Everything a restart needs: global state, outer and inner optimizers, counters (call flush() first)."""
        snap = self.snapshot()
        return {
            "round_id": snap.round_id,
            "global": snap.tensors,
            "meta": snap.meta,
            "inner": self.inner.state_dict(),
            "inner_steps": self.inner_steps,
            "counters": self._counters(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned; the model's (local) parameters are the caller's to restore."""
        snapshot = StateSnapshot(round_id=state["round_id"], tensors=state["global"], meta=state["meta"])
        take_meta = self._taking_meta(snapshot.meta)
        mine, outer = group_settings(self.inner), group_settings(self.state.outer)
        problem = inner_kind_problem(mine, state["inner"].get("param_groups", []))
        if problem:
            raise ConfigError(problem)
        self.state.restore(snapshot, into_model=False)
        self.inner.load_state_dict(state["inner"])
        # Loading takes the saved hyperparameters too: this peer's own stay (its --inner-lr, the usual reason to
        # restart a peer; its --outer-lr, which its joins tell the coordinator), and only the moments are restored.
        with self.state.lock:
            keep_settings(self.state.outer, outer, "outer")
        keep_settings(self.inner, mine, "inner")
        self.inner_steps = int(state["inner_steps"])
        take_meta()
        self._load_counters(state.get("counters", {}))
