"""``comapoi eval score``: predictions files, per-line error reports, the CLI."""

from __future__ import annotations

import json

import pytest

from comapoi_cli.errors import DataError, UsageError
from comapoi_cli.evaluation.outputs import latest_metrics, metrics_csv
from comapoi_cli.evaluation.predictions import PredictionsFileError, score_predictions
from comapoi_cli.plugins import build_registry
from comapoi_cli.runs.record import append_evaluation
from tests.support import run_comapoi


@pytest.fixture(scope="module")
def registry():
    return build_registry(load_entry_points=False)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


# one record per hand-computed case: rank 1, rank 7, absent, duplicates (rank 3 after dedup), id 0, unparsable
CASES = [
    {"id": "a", "label": 22, "output": '{"next_poi_id": [22, 1, 12]}'},
    {"id": "b", "label": 7, "output": "[1, 2, 3, 4, 5, 6, 7, 8]"},
    {"id": "c", "label": 99, "predicted_poi_ids": [1, 2, 3]},
    {"id": "d", "label": "9", "output": "5, 5, 3, 3, 9"},
    {"id": "e", "label": 0, "output": '{"next_poi_id": 0}'},
    {"id": "f", "label": 4, "output": "Sorry, I cannot tell."},
]


def expected_case_metrics():
    # per record: (acc1, acc5, acc10, acc20, ndcg5, ndcg10, ndcg20, rr)
    import math

    def row(rank):
        if rank is None:
            return [0.0] * 8
        return [float(rank <= k) for k in (1, 5, 10, 20)] + \
               [1 / math.log2(rank + 1) if rank <= k else 0.0 for k in (5, 10, 20)] + [1 / rank]
    rows = [row(1), row(7), row(None), row(3), row(1), row(None)]
    keys = ["acc@1", "acc@5", "acc@10", "acc@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr"]
    out = {k: round(100 * sum(r[i] for r in rows) / 6, 4) for i, k in enumerate(keys)}
    out["unparsable"] = round(100 / 6, 4)
    out["n"] = 6
    return out


def test_score_hand_computed_file(tmp_path, registry):
    path = write_lines(tmp_path / "p.jsonl", CASES)
    report = score_predictions(path, dataset="nyc", registry=registry)
    assert report.metrics == expected_case_metrics()
    assert report.lines == 6 and not report.skipped and report.roles == ["poi_ids"]


def test_predicted_list_wins_unless_reparse(tmp_path, registry):
    path = write_lines(tmp_path / "p.jsonl", [{"label": 3, "output": "3", "predicted_poi_ids": [4]}])
    assert score_predictions(path, registry=registry).metrics["acc@1"] == 0.0
    assert score_predictions(path, reparse=True, registry=registry).metrics["acc@1"] == 100.0
    null = write_lines(tmp_path / "n.jsonl", [{"label": 3, "output": "3", "predicted_poi_ids": None}])
    assert score_predictions(null, registry=registry).metrics["unparsable"] == 100.0


def test_dataset_range_rejects_ids(tmp_path, registry):
    path = write_lines(tmp_path / "p.jsonl", [{"label": 3, "output": "[6000, 3]"}])
    assert score_predictions(path, registry=registry).metrics["acc@1"] == 0.0  # no range: 6000 counts
    assert score_predictions(path, dataset="nyc", registry=registry).metrics["acc@1"] == 100.0
    per_line = write_lines(tmp_path / "q.jsonl", [{"label": 3, "output": "[6000, 3]", "dataset": "nyc"}])
    assert score_predictions(per_line, registry=registry).metrics["acc@1"] == 100.0


def test_per_role_breakdown_and_candidate_recall(tmp_path, registry):
    cands = list(range(100, 125))
    path = write_lines(tmp_path / "p.jsonl", [
        {"label": 1, "output": "1", "role": "agent3"},
        {"label": cands[21], "predicted_poi_ids": cands, "role": "agent1"},
        {"label": 5, "predicted_poi_ids": cands, "agent": "agent2"},
    ])
    report = score_predictions(path, registry=registry)
    assert report.metrics["n"] == 3 and report.metrics["candidate_recall"] == 50.0
    assert set(report.by_role) == {"agent1", "agent2", "agent3"}
    assert report.by_role["agent1"]["candidate_recall"] == 100.0
    assert "candidate_recall" not in report.by_role["agent3"]
    # --type overrides each line's role
    assert score_predictions(path, role="agent3", registry=registry).by_role == {}


def test_bad_lines_are_reported_one_by_one(tmp_path, registry):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join([
        json.dumps({"label": 1, "output": "1", "id": 1}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"output": "3"}),
        json.dumps({"label": "abc", "output": "3"}),
        json.dumps({"label": 3}),
        json.dumps({"label": 3, "output": 3}),
        json.dumps({"label": 3, "predicted_poi_ids": ["x"]}),
        json.dumps({"label": 3, "predicted_poi_ids": {"a": 1}}),
        json.dumps({"label": 1, "output": "1", "id": 1}),
        json.dumps({"label": 1, "output": "1", "role": "agent77"}),
        json.dumps({"label": 6000, "output": "1", "dataset": "nyc"}),
        "",
        "\r",
    ]).encode() + b"\n\xff\xfe\n" + json.dumps({"label": 2, "output": "2"}).encode() + b"\r\n")
    with pytest.raises(PredictionsFileError) as info:
        score_predictions(path, registry=registry)
    problems = {p.line: p.message for p in info.value.problems}
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15]
    assert "not valid JSON" in problems[2]
    assert "expected a JSON object" in problems[3]
    assert "missing 'label'" in problems[4]
    assert "'abc' is not a POI id" in problems[5]
    assert "needs 'output'" in problems[6]
    assert "'output' must be a string" in problems[7]
    assert "not a POI id" in problems[8] and "predicted_poi_ids" in problems[8]
    assert "must be a list" in problems[9]
    assert "repeats line 1" in problems[10]
    assert "unknown role 'agent77'" in problems[11]
    assert "outside nyc's ids 0..5091" in problems[12]
    assert "not UTF-8" in problems[15]
    assert "12 of 14 lines" in info.value.message
    report = score_predictions(path, skip_invalid=True, registry=registry)
    assert report.metrics["n"] == 2 and report.metrics["acc@1"] == 100.0 and len(report.skipped) == 12


def test_file_errors(tmp_path, registry):
    with pytest.raises(DataError, match="does not exist"):
        score_predictions(tmp_path / "missing.jsonl", registry=registry)
    with pytest.raises(DataError, match="is a folder"):
        score_predictions(tmp_path, registry=registry)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no predictions"):
        score_predictions(empty, registry=registry)
    with pytest.raises(UsageError, match="Unknown agent role"):
        score_predictions(empty, role="nope", registry=registry)


def test_outputs_helpers(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"args": {}}))
    append_evaluation(run, {"data": "x", "metrics": {"acc@1": 1.0}})
    append_evaluation(run, {"data": "y", "metrics": {"acc@1": 2.0}})
    data = json.loads(run.read_text())
    assert [e["data"] for e in data["evaluations"]] == ["x", "y"] and data["args"] == {}
    assert latest_metrics(data) == {"acc@1": 2.0} and latest_metrics({}) is None
    text = metrics_csv({"acc@1": 50.0, "n": 2}, {"agent3": {"acc@1": 100.0, "n": 1}})
    lines = text.splitlines()
    assert lines[0].startswith("scope,acc@1,acc@5") and lines[1].startswith("all,50.0,") and lines[2].startswith("agent3,100.0")


def test_cli_score_table_json_and_output(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", CASES)
    out_csv = tmp_path / "m.csv"
    result = run_comapoi("eval", "score", str(path), "--dataset", "nyc", "--json", "-o", str(out_csv))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["metrics"] == expected_case_metrics()
    assert out_csv.read_text().startswith("scope,acc@1")
    table = run_comapoi("eval", "score", str(path))
    assert table.returncode == 0 and "acc@1" in table.stdout and "16.67" in table.stdout  # unparsable 1/6


def test_cli_score_bad_file_is_reported_without_traceback(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"label": 1, "output": "1"}, {"label": "x", "output": "1"}, "[1"])
    result = run_comapoi("eval", "score", str(path))
    assert result.returncode == 1
    assert "line 2: label 'x' is not a POI id" in result.stderr and "line 3: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and "--skip-invalid" in result.stderr
    skipped = run_comapoi("eval", "score", str(path), "--skip-invalid")
    assert skipped.returncode == 0 and "skipped 2 invalid lines" in skipped.stderr
    missing = run_comapoi("eval", "score", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_eval_usage_errors(tmp_path):
    none = run_comapoi("eval", "--data", str(tmp_path / "x.jsonl"))
    assert none.returncode == 2 and "--adapter" in none.stderr
    misplaced = run_comapoi("eval", "--dataset", "nyc", "score", str(tmp_path / "x.jsonl"))
    assert misplaced.returncode == 2 and "belongs to 'comapoi eval'" in misplaced.stderr
    helps = run_comapoi("eval", "--help"), run_comapoi("eval", "score", "--help")
    assert all(h.returncode == 0 for h in helps)
    assert "--adapter" in helps[0].stdout and "score" in helps[0].stdout and "--skip-invalid" in helps[1].stdout
