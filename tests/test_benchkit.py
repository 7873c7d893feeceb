"""The benchmarks' shared report printer: JSON that scripts parse, or aligned "key: value" lines for people."""

from __future__ import annotations

import io

from peer.bench.kit import print_report


def printed(report: dict, as_json: bool, **kwargs) -> str:
    out = io.StringIO()
    print_report(report, as_json, out=out, **kwargs)
    return out.getvalue()


def test_json_is_one_line_of_json_dumps():
    assert printed({"n": 3, "median_s": 0.5, "baseline": {"x": [1, 2]}}, True) == (
        '{"n": 3, "median_s": 0.5, "baseline": {"x": [1, 2]}}\n'
    )


def test_text_right_aligns_keys_to_the_longest():
    assert printed({"n": 3, "median_s": 0.5}, False) == "       n: 3\nmedian_s: 0.5\n"


def test_text_formats_values_and_keeps_continuation_lines_in_the_value_column():
    report = {"a": [1, 2], "bb": 1.0}
    assert printed(report, False, fmt=lambda v: "\n".join(map(str, v)) if isinstance(v, list) else f"{v:.2f}") == (
        " a: 1\n    2\nbb: 1.00\n"
    )


def test_default_output_is_stdout_at_call_time(capsys):
    print_report({"k": 1}, True)
    assert capsys.readouterr().out == '{"k": 1}\n'
