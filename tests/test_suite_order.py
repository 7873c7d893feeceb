"""The suite's own order (tests/support/durations.py): files slowest first, so two workers finish together."""

from __future__ import annotations

from support.durations import parse, slowest_first

REPORT = """\
============================= slowest durations =============================
61.40s setup    tests/test_b.py::test_report
12.00s call     tests/test_b.py::test_report
3.25s call     tests/test_a.py::test_one[int8-2]
0.50s teardown tests/test_a.py::test_two
(10 durations < 0.005s hidden.  Use -vv to show these durations.)
""".splitlines()


def test_a_durations_report_sums_setup_call_and_teardown_per_file():
    assert parse(REPORT) == {"tests/test_a.py": 3.8, "tests/test_b.py": 73.4}


def test_files_run_slowest_first_each_keeping_its_own_order():
    ids = ["tests/test_a.py::one", "tests/test_a.py::two", "tests/test_b.py::one", "tests/test_c.py::one"]
    seconds = {"tests/test_a.py": 3.0, "tests/test_b.py": 70.0, "tests/test_c.py": 10.0}
    assert slowest_first(ids, seconds) == [
        "tests/test_b.py::one", "tests/test_c.py::one", "tests/test_a.py::one", "tests/test_a.py::two"
    ]


def test_a_file_not_measured_yet_goes_first():
    ids = ["tests/test_a.py::one", "tests/test_new.py::one"]
    assert slowest_first(ids, {"tests/test_a.py": 3.0}) == ["tests/test_new.py::one", "tests/test_a.py::one"]
