"""``loconet bench coding``: every method on the same data and seeds, with the fields the issue names."""

from __future__ import annotations

import threading

import pytest

from collectives.errors import ConfigError
from peer.bench.coding import FIELDS, CodingBenchConfig, _stop_workers, method, run, steps_of
from peer.bench.fields import undocumented
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(300)

TINY = TaskConfig(d_model=16, n_layers=1, n_heads=2, batch_size=4, seq_len=16)
ISSUE_FIELDS = {"method", "step_s_median", "step_s_p90", "time_to_target_s", "final_eval_loss",
                "decode_rel_error_max", "bytes_sent_per_peer", "compute_load"}


@pytest.fixture(scope="module")
def report():
    config = CodingBenchConfig(peers=4, stragglers=1, pattern="random,x=3", steps=3, unit_s=0.01, eval_every=1,
                               check_every=1, methods=("wait", "coded", "ignore", "backup", "fixed-k3"),
                               overrun=1.0, task_config=TINY)
    return run(config)


def test_the_report_has_the_fields_the_issue_names(report):
    assert {"peers", "stragglers", "pattern", "methods"} <= set(report)
    assert (report["peers"], report["stragglers"], report["pattern"]) == (4, 1, "random,x=3")
    for entry in report["methods"]:
        assert ISSUE_FIELDS <= set(entry)


def test_every_field_of_the_report_is_documented(report):
    assert undocumented(report, FIELDS) == []


def test_every_method_ends_with_identical_workers(report):
    assert [e["method"] for e in report["methods"]] == ["wait", "coded", "ignore", "backup", "fixed-k3"]
    for entry in report["methods"]:
        assert entry["identical"], entry["method"]
        assert entry["steps_committed"] == 3


def test_every_worker_sends_its_rounds_over_the_network_as_on_a_machine_of_its_own(report):
    # The workers are threads of one process: with one host id they reduced through shared memory, sent 0 bytes and
    # ran no codec, and the methods' bytes compared nothing.
    for entry in report["methods"]:
        assert entry["bytes_sent_per_peer"] > 0, entry["method"]


def test_the_target_is_wait_for_alls_final_loss(report):
    wait = report["methods"][0]
    assert report["target_eval_loss"] == wait["final_eval_loss"]
    assert wait["time_to_target_over_wait"] == 1.0


def test_coded_and_wait_for_all_apply_the_full_gradient(report):
    for entry in report["methods"][:2]:
        assert entry["decode_rel_error_max"] < 1e-5
        assert entry["curve_max_abs_diff_from_wait"] < 1e-4


def test_coded_workers_compute_s_plus_one_partitions(report):
    coded = report["methods"][1]
    # Each worker's code row holds two of the four partitions (s+1 = 2), so no worker computes more than half a
    # step's data. The fractional repetition code decodes from one worker of each of its two groups, so a step
    # commits once two workers computed both their partitions; the other two may be superseded before their
    # first: a quarter is the least a committed step costs, and a loaded machine reaches it.
    assert 0.25 - 1e-9 <= coded["compute_load"] <= 0.5 + 1e-9


@pytest.mark.parametrize("name,quorum", [("wait", "all"), ("ignore", "allbut:1"), ("coded", "coded:1"),
                                         ("m-sgc", "grace:3,f=0.2"), ("backup", "backup"), ("fixed-k2", "allbut:2")])
def test_each_method_runs_on_its_quorum_policy(name, quorum):
    assert method(name, CodingBenchConfig(peers=4, stragglers=1)).quorum == quorum


@pytest.mark.parametrize("fields,message", [
    ({"methods": ("slowest",)}, "unknown method"),
    ({"methods": ("fixed-k9",)}, "unknown method"),
    ({"stragglers": 6}, "--stragglers"),
    ({"pattern": "sometimes"}, "pattern"),
    # A straggler that is none of the workers: the run had none, and its report said worker 5 was slowed.
    ({"peers": 3, "pattern": "persistent,worker=5,x=3"},
     r"--pattern persistent,worker=5,x=3: worker 5 is none of the 3 \(workers 0..2\); name one of the --peers 3"),
])
def test_bad_options_are_refused_before_any_run(fields, message):
    with pytest.raises(ConfigError, match=message):
        CodingBenchConfig(**fields)


def test_sequential_codes_report_their_load_against_plain_gradient_coding():
    config = CodingBenchConfig(peers=4, pattern="bursty,B=1,W=3,lambda=1,x=4,p=0.5", steps=8, unit_s=0.02,
                               eval_every=1, check_every=1, methods=("m-sgc",), overrun=1.0, task_config=TINY)
    (entry,) = run(config)["methods"]
    assert entry["sgc_model"] == {"B": 2, "W": 4, "lambda": 1, "T": 4}  # the pattern's, one round longer
    assert entry["identical"]
    assert entry["decode_rel_error_max"] < 1e-5
    # M-SGC's load: (lambda+1)(W-1+B) / (n(B+(W-1)(lambda+1))) = 2*5 / (4*8), against plain GC's 2/4.
    assert entry["load_formula"] == entry["round_load_max"] == 10 / 32
    assert entry["gc_load_same_tolerance"] == 0.5


def test_every_method_but_wait_for_all_trains_overrun_times_longer():
    config = CodingBenchConfig(steps=10, overrun=1.5)
    assert [steps_of(method(m, config), config) for m in ("wait", "coded", "backup")] == [10, 15, 15]


def test_stopping_the_workers_sets_the_event_frees_the_barriers_and_joins_them():
    # A stuck run raised while its workers kept training; now every way out stops and joins them.
    joined, stop = threading.Barrier(2), threading.Event()
    seen = []

    def worker() -> None:
        try:
            joined.wait(timeout=60)
        except threading.BrokenBarrierError:
            seen.append("freed")
        stop.wait(timeout=60)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    _stop_workers([thread, threading.Thread(target=worker)], stop, (joined,))  # the second never started
    assert stop.is_set() and not thread.is_alive() and seen == ["freed"]
