"""Evaluation against hostile inputs, through the real CLI: a number past Python's int limit, plugin names in errors."""

from __future__ import annotations

import json

from tests.support import run_comapoi

HUGE = "7" * 5000  # more than Python's 4,300-digit int-conversion limit


def test_score_counts_an_output_with_a_huge_number_as_a_miss_not_a_dropped_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    lines = [{"label": 3, "output": "3, 4"}, {"label": 5, "output": f"the next POI is {HUGE}"},
             {"label": 5, "output": f"[{HUGE}, 5]"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for extra in ((), ("--skip-invalid",)):
        result = run_comapoi("eval", "score", str(path), "--dataset", "nyc", "--json", *extra)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        metrics = report["metrics"]
        assert metrics["n"] == 3 and report["skipped_lines"] == []  # unparsable is a miss, in n
        # the huge number is an id out of range, dropped as [99999, 5] drops 99999: "[HUGE, 5]" ranks 5 first;
        # "the next POI is HUGE" holds no id at all: unparsable, a miss
        assert metrics["acc@1"] == round(200 / 3, 4) and metrics["unparsable"] == round(100 / 3, 4)


def test_score_reports_a_line_with_a_huge_integer_literal_and_goes_on(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"label": 3, "output": "3"}) + "\n" + '{"label": ' + HUGE + ', "output": "3"}\n')
    failed = run_comapoi("eval", "score", str(path))
    assert failed.returncode != 0 and "Traceback" not in failed.stderr and "Unexpected" not in failed.stderr
    assert "line 2: not valid JSON (a number of more than 4,300 digits)" in failed.stderr
    skipped = run_comapoi("eval", "score", str(path), "--skip-invalid", "--json")
    assert skipped.returncode == 0, skipped.stderr
    report = json.loads(skipped.stdout)
    assert report["metrics"]["n"] == 1 and report["skipped_lines"][0]["line"] == 2
