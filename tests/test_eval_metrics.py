"""CoMaPOI's metrics on hand-computed cases, and the lenient POI id parser they rely on."""

from __future__ import annotations

import math

import pytest

from comapoi_cli.evaluation.scoring import LabelError, Scorer
from comapoi_cli.metrics import METRIC_KEYS, compute_metrics, outcome, rank_of
from comapoi_cli.plugins import build_registry
from comapoi_cli.poi_ids import clean_ids, is_id_list, parse_ids, read_ids
from comapoi_cli.roles import AgentRole, RoleContext

ZERO = {"acc@1": 0.0, "acc@5": 0.0, "acc@10": 0.0, "acc@20": 0.0, "ndcg@5": 0.0, "ndcg@10": 0.0,
        "ndcg@20": 0.0, "mrr": 0.0}


@pytest.fixture(scope="module")
def roles():
    return build_registry(load_entry_points=False).roles


def metrics_of(label, predictions, candidate=False):
    return compute_metrics([outcome(label, predictions, candidate_list=candidate)])


def test_label_at_rank_1():
    m = metrics_of(22, [22, 1, 12])
    assert m == {"acc@1": 100.0, "acc@5": 100.0, "acc@10": 100.0, "acc@20": 100.0, "ndcg@5": 100.0,
                 "ndcg@10": 100.0, "ndcg@20": 100.0, "mrr": 100.0, "unparsable": 0.0, "n": 1}


def test_label_at_rank_7():
    m = metrics_of(7, [1, 2, 3, 4, 5, 6, 7, 8])
    # 1/log2(7+1) = 1/3; 1/7
    assert m["acc@1"] == m["acc@5"] == 0.0
    assert m["acc@10"] == m["acc@20"] == 100.0
    assert m["ndcg@5"] == 0.0
    assert m["ndcg@10"] == m["ndcg@20"] == pytest.approx(33.3333, abs=1e-4)
    assert m["mrr"] == pytest.approx(14.2857, abs=1e-4)


def test_label_at_rank_21_counts_only_in_mrr():
    m = metrics_of(21, list(range(1, 30)))
    assert {k: m[k] for k in ZERO if k != "mrr"} == {k: 0.0 for k in ZERO if k != "mrr"}
    assert m["mrr"] == pytest.approx(100 / 21, abs=1e-4)


def test_label_absent():
    m = metrics_of(99, [1, 2, 3])
    assert {k: m[k] for k in ZERO} == ZERO
    assert m["unparsable"] == 0.0 and m["n"] == 1


def test_duplicates_are_dropped_before_ranking():
    # [5, 5, 3, 3, 9] ranks as [5, 3, 9]: the label is 3rd, not 5th
    assert rank_of(9, [5, 5, 3, 3, 9]) == 3
    m = metrics_of(9, [5, 5, 3, 3, 9])
    assert m["acc@1"] == 0.0 and m["acc@5"] == 100.0
    assert m["ndcg@5"] == pytest.approx(50.0)  # 1/log2(4)
    assert m["mrr"] == pytest.approx(33.3333, abs=1e-4)


def test_unparsable_output_scores_zero_and_is_counted():
    m = metrics_of(3, None)
    assert {k: m[k] for k in ZERO} == ZERO
    assert m["unparsable"] == 100.0


def test_averages_over_records_in_percent():
    items = [outcome(1, [1]), outcome(7, [1, 2, 3, 4, 5, 6, 7]), outcome(9, [2]), outcome(3, None)]
    m = compute_metrics(items)
    assert m["n"] == 4
    assert m["acc@1"] == 25.0 and m["acc@5"] == 25.0 and m["acc@10"] == 50.0
    assert m["ndcg@10"] == pytest.approx(round(100 * (1 + 1 / 3) / 4, 4))
    assert m["mrr"] == pytest.approx(round(100 * (1 + 1 / 7) / 4, 4))
    assert m["unparsable"] == 25.0
    assert "candidate_recall" not in m
    assert list(m) == [k for k in METRIC_KEYS if k not in ("candidate_recall", "exact_match")]


def test_ndcg_formula_matches_the_definition():
    for rank in range(1, 21):
        preds = list(range(100, 100 + rank - 1)) + [0]
        m = metrics_of(0, preds)
        for k in (5, 10, 20):
            expected = 100 / math.log2(rank + 1) if rank <= k else 0.0
            assert m[f"ndcg@{k}"] == pytest.approx(expected, abs=1e-4)


def test_candidate_recall_uses_the_whole_list():
    lst = list(range(100, 125))  # 25 candidates; the label is 22nd
    label = lst[21]
    m = compute_metrics([outcome(label, lst, candidate_list=True), outcome(5, lst, candidate_list=True)])
    assert m["acc@20"] == 0.0
    assert m["candidate_recall"] == 50.0


def test_no_records():
    m = compute_metrics([])
    assert m["n"] == 0 and m["acc@1"] == 0.0


# ---- the parser ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('{"next_poi_id": 22}', [22]),
    ('{"next_poi_id": [3, 1, 3, 0]}', [3, 1, 0]),
    ("[3, 1]", [3, 1]),
    ("22", [22]),
    ("0", [0]),
    ('{"next_poi_id": 0}', [0]),
    ("[ { 'next POI ID': 17 } ]", [17]),  # the format the original system prompt asks for
    ("{'next_poi_id': [1, 2]}", [1, 2]),
    ('```json\n{"next_poi_id": [5, 7]}\n```', [5, 7]),
    ('Sure. {"next_poi_id": 9} is my answer, not 12.', [9]),
    ('{"reason": "likes coffee at 12", "next_poi_id": "4"}', [4]),
    ("The next POI is 22.", [22]),
    ("next POI ID: 22", [22]),
    ("candidates: 5, 6. The next POI ID is 22", [22]),
    ("Based on 12 visits, the ranking is 22, 1, 12, 35", [22, 1, 12, 35]),
    ("1. POI 22\n2. POI 35\n3. POI 7", [22, 35, 7]),
    ("22, 1, 12, 35,", [22, 1, 12, 35]),
    ('{"2": 35, "1": 22, "3": 7}', [22, 35, 7]),  # rank-keyed objects, in rank order
    ('[{"poi_id": 22, "score": 0.9}, {"poi_id": 35, "score": 0.5}]', [22, 35]),
    ('{"next_poi_id": "22, 35, 7"}', [22, 35, 7]),
    ("At 2012-07-06 14:10:22, Friday, POI (40.61740978,-73.95989862) is 28", [28]),
])
def test_parse_ids(text, expected):
    assert parse_ids(text, 5091) == expected


@pytest.mark.parametrize("text", ["", "   ", "I cannot tell.", "user_0 at 15:36:09 on 2012-04-04", "40.75,-73.98"])
def test_unparsable_text(text):
    assert parse_ids(text, 5091) is None
    assert read_ids(text, 5091).problem == "no POI id in the output"


def test_ids_outside_the_range_are_rejected():
    got = read_ids("[5092, 3, -1, 3, 5091]", 5091)
    assert got.ids == [3, 5091]
    assert got.rejected == [5092, -1] and got.duplicates == 1
    only_bad = read_ids('{"next_poi_id": 99999}', 5091)
    assert only_bad.ids == [] and "outside" in only_bad.problem
    assert parse_ids("99999") == [99999]  # no range known: no upper bound


def test_clean_ids():
    assert clean_ids([3, "4", 3, 0], 10).ids == [3, 4, 0]
    with pytest.raises(ValueError, match="not a POI id"):
        clean_ids([3, "x"])
    with pytest.raises(ValueError):
        clean_ids([True])


def test_is_id_list():
    assert is_id_list("22, 1, 12") and is_id_list("[22,1]") and is_id_list("22")
    assert is_id_list("22, -1")  # a list with a bad id (the data checker rejects it as out of range)
    assert not is_id_list("a profile text with 22 in it") and not is_id_list("1.5")


# ---- roles and scorers --------------------------------------------------------------------

def test_comapoi_roles_answer_kinds(roles):
    assert roles["agent3"].answer_kind == "poi_ids"
    assert roles["agent1"].answer_kind == roles["agent2"].answer_kind == "candidates"
    assert AgentRole.answer_kind == "text"


def test_agent3_target_and_parser(roles):
    scorer = Scorer(roles["agent3"], RoleContext("nyc"))
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '{"next_poi_id": 0}'}]}
    assert scorer.target(record) == 0
    assert scorer.parse_output('{"next_poi_id": [0, 5091, 5092]}').predictions == [0, 5091]
    parsed = scorer.parse_output("no idea")
    assert parsed.predictions is None and parsed.problem == "unparsable: no POI id in the output"


def test_candidate_roles_need_an_explicit_label(roles):
    scorer = Scorer(roles["agent1"], RoleContext("nyc"))
    candidates = ", ".join(str(i) for i in range(25))
    plain = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": candidates}]}
    with pytest.raises(LabelError):
        scorer.target(plain)
    assert scorer.target({**plain, "next_poi_id": 7}) == 7
    assert scorer.target({**plain, "meta": {"next_poi_id": "7"}}) == 7
    profile = {"messages": [{"role": "assistant", "content": "Likes coffee."}], "next_poi_id": 7}
    with pytest.raises(LabelError):
        scorer.target(profile)


def test_labels_are_checked(roles):
    scorer = Scorer(roles["agent3"], RoleContext("nyc"))
    assert scorer.label("12") == 12 and scorer.label(0) == 0 and scorer.label(3.0) == 3
    for bad in ("abc", True, [1], 1.5, -1, 5092, None):
        with pytest.raises(LabelError):
            scorer.label(bad)


def test_third_party_role_gets_exact_match():
    class Summary(AgentRole):
        id = "agent9"

    scorer = Scorer(Summary())
    assert scorer.kind == "text"
    label = scorer.label("  Likes coffee. ")
    assert scorer.outcome(label, scorer.parse_output("Likes coffee.\n").predictions).rank == 1
    assert scorer.outcome(label, scorer.parse_output("Likes tea.").predictions).rank is None
    assert scorer.parse_output("   ").predictions is None


def test_a_broken_third_party_parser_counts_as_unparsable():
    class Broken(AgentRole):
        id = "agent9"
        answer_kind = "poi_ids"

        def parse_prediction(self, text, context):
            raise RuntimeError("boom")

    parsed = Scorer(Broken()).parse_output("22")
    assert parsed.predictions is None and "boom" in parsed.problem
