"""DriveLM / COCO language metrics and the local metrics against values worked out by hand."""

import json
import math
from pathlib import Path

import pytest

from mose_lightning.evaluation.cider import cider_d, coco_tokenize
from mose_lightning.evaluation.drivelm_metrics import (
    ACCURACY,
    JUDGE,
    LANGUAGE,
    MATCH,
    ObjectTag,
    bleu_scores,
    categorize,
    drivelm_scores,
    exact_match,
    extract_object_tags,
    language_aggregate,
    lcs_length,
    final_score,
    match_f1,
    needs_judge,
    rouge_l,
)
from mose_lightning.evaluation.local_metrics import local_scores, normalize_answer, token_f1

L = math.log(2.0)  # idf of an n-gram found in one of two samples' references


def test_coco_tokenize_keeps_coordinates_and_drops_punctuation():
    assert coco_tokenize("What's <c1,CAM_BACK,1088.3,497.5>? Yes.") == [
        "what", "'s", "<", "c1", "cam_back", "1088.3", "497.5", ">", "yes",
    ]


def test_cider_d_hand_computed_with_clipping_and_length_penalty():
    # Sample 1: candidate repeats "car"; "a" is in both samples' references so its idf is log2 - log2 = 0.
    # unigrams: cand (red L, car 2L), ref (red L, car L): clipped dot = L*L + min(2L, L)*L = 2L^2 -> 2/sqrt(10)
    # bigrams: cand (a red, red car, car car), ref (a red, red car): 2/sqrt(6); trigrams: 1/sqrt(2); 4-grams: 0
    # length (bigram count) 3 vs 2 -> penalty exp(-1/72); score = 10 * mean over n
    sims = 2 / math.sqrt(10) + 2 / math.sqrt(6) + 1 / math.sqrt(2)
    s1 = 10 * sims * math.exp(-1 / 72) / 4
    s2 = 10 * 3 / 4  # identical 3-word sentence: cosine 1 for n = 1..3, no 4-grams
    res = cider_d(["a red car car", "a blue truck"], [["a red car"], ["a blue truck"]])
    assert res.per_sample == pytest.approx([s1, s2], abs=1e-9)
    assert res.score == pytest.approx((s1 + s2) / 2, abs=1e-9)
    assert res.score == pytest.approx(6.40790, abs=1e-5)


def test_cider_matches_published_coco_tool_output():
    # language-evaluation's documented CocoEvaluator output for this input: CIDEr 3.333..., ROUGE_L 0.75
    res = cider_d(["i am a boy", "she is a girl"], [["am i a boy ?"], ["is she a girl ?"]])
    assert res.score == pytest.approx(10 / 3, abs=1e-9)


def test_cider_multiple_references_average():
    # Second reference of sample 1 shares nothing -> its similarity is 0, so the score halves.
    one = cider_d(["a red car", "a blue truck"], [["a red car"], ["a blue truck"]]).per_sample[0]
    two = cider_d(["a red car", "a blue truck"], [["a red car", "green bus"], ["a blue truck"]]).per_sample[0]
    assert one == pytest.approx(7.5)
    assert two == pytest.approx(3.75)


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError, match="candidates"):
        cider_d(["a"], [])
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d(["a"], ["a"])


def test_bleu_by_hand():
    # the cat sat on the mat / the cat is on the mat: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0, equal lengths
    s = bleu_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert s["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert s["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert s["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    assert s["bleu_4"] == 0.0
    # brevity penalty: 2 candidate words vs 4 reference words -> exp(1 - 4/2)
    assert bleu_scores(["the cat"], ["The cat is here."])["bleu_1"] == pytest.approx(math.exp(-1), abs=1e-6)


def test_bleu_picks_closest_reference_length():
    # refs of 2 and 4 words; candidate of 3 -> COCO takes the shorter (2) on a tie: no brevity penalty
    assert bleu_scores(["a b c"], [["a b", "a b c d"]])["bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_by_hand():
    assert lcs_length("the cat sat on the mat".split(), "the cat is on the mat".split()) == 5
    # LCS 3, P = 3/3, R = 3/5, beta = 1.2: (1 + 1.44) * 1 * 0.6 / (0.6 + 1.44 * 1)
    assert rouge_l("the cat sat".split(), ["the big cat sat down".split()]) == pytest.approx(1.464 / 2.04)
    # several references: best precision and best recall may come from different references
    cand = "a b c d".split()
    refs = ["a b".split(), "a b c d e f g h".split()]  # P: 2/4 vs 4/4 -> 1; R: 2/2 vs 4/8 -> 1
    assert rouge_l(cand, refs) == pytest.approx(1.0)
    assert rouge_l([], [["a"]]) == 0.0


def test_exact_match_edge_cases():
    assert exact_match(" B\n", "B")
    assert not exact_match("B.", "B")
    assert not exact_match("yes.", "Yes.")
    assert not exact_match(None, "A")


def test_object_tag_regex_edge_cases():
    text = "Notice <c1,CAM_FRONT,1043.2,82.2> then < c2 , cam_back , 864 , 468.3 > and <c3,CAM_FRONT,bad,1.0>."
    assert extract_object_tags(text) == [
        ObjectTag("c1", "CAM_FRONT", 1043.2, 82.2),
        ObjectTag("c2", "CAM_BACK", 864.0, 468.3),
    ]
    assert extract_object_tags("<c1,CAM_FRONT_LEFT,1.5,2.5>")[0].camera == "CAM_FRONT_LEFT"
    assert extract_object_tags(None) == []
    assert extract_object_tags("no tags, just 1.5 and 2.5") == []


REF_TAGS = "<c1,CAM_FRONT,100.0,200.0> <c2,CAM_BACK,500.0,300.0> <c3,CAM_FRONT,800.0,450.0>"
PRED_TAGS = "<c1,CAM_FRONT,105.0,209.0> <c2,CAM_BACK,510.0,306.0> <c9,CAM_FRONT_LEFT,800.0,450.0>"


def test_match_f1_by_hand():
    # c1: L1 = 14 < 16 match; c2: L1 = 16, not < 16; c9: right place, wrong camera -> TP 1, FP 2, FN 2
    assert match_f1(PRED_TAGS, REF_TAGS) == pytest.approx(1 / 3)
    # official behaviour ignores the camera: c9 matches c3 -> TP 2, FP 1, FN 1
    assert match_f1(PRED_TAGS, REF_TAGS, same_camera=False) == pytest.approx(2 / 3)
    assert match_f1("nothing", REF_TAGS) == 0.0
    assert match_f1("none", "none") == 1.0
    # a reference tag is used once: two predictions at the same place give TP 1, FP 1 against one reference
    assert match_f1("<c1,CAM_FRONT,1.0,1.0> <c1,CAM_FRONT,1.0,1.0>", "<c1,CAM_FRONT,1.0,1.0>") == pytest.approx(2 / 3)


def _rec(key, task, question, reference, prediction):
    return {"key": key, "dataset": "drivelm", "task": task, "question": question, "reference": reference,
            "prediction": prediction, "category": None, "skills": None, "skill_chain": [], "images": []}


def test_categorize_rules():
    mc = "What is the moving status of object <c1,CAM_BACK,1.0,2.0>? Please select the correct answer from the " \
         "following options: A. Going ahead. B. Stopped. C. Back up. D. Turn left."
    assert categorize(_rec("a", "perception", mc, "D", "D")) == {ACCURACY}
    assert categorize(_rec("b", "behavior", "Predict the behavior of the ego vehicle.", "The ego...", "")) == {ACCURACY}
    assert categorize(_rec("c", "prediction", "Is <c1,CAM_BACK,1.0,2.0> a traffic sign?", "No.", "")) == {ACCURACY}
    assert categorize(_rec("d", "prediction", "What to notice first?", f"First {REF_TAGS}", "")) == {MATCH, JUDGE}
    assert categorize(_rec("e", "perception", "Important objects?", f"A car. {REF_TAGS}", "")) == {LANGUAGE, JUDGE}
    assert categorize(_rec("f", "planning", "What are safe actions?", "None, no, none.", "")) == {LANGUAGE, JUDGE}
    explicit = dict(_rec("g", "planning", "q", "a", "p"), tag=[1])
    assert categorize(explicit) == {JUDGE}
    assert needs_judge(_rec("h", "planning", "q", "Keep going.", "p"))
    assert not needs_judge(_rec("i", "behavior", "q", "A", "A"))
    with pytest.raises(ValueError, match="unknown DriveLM tag"):
        categorize(dict(explicit, tag=[7]))


def test_final_score_formula():
    assert final_score(80.0, 0.5, 40.0, 0.25) == pytest.approx(0.4 * 0.8 + 0.2 * 0.5 + 0.2 * 0.4 + 0.2 * 0.25)
    lang = {"bleu_1": 0.8, "bleu_2": 0.6, "bleu_3": 0.4, "bleu_4": 0.2, "rouge_l": 0.6, "cider": 3.0}
    assert language_aggregate(lang) == pytest.approx(2.0 / 12 + 0.2 + 0.1)


def _drivelm_records():
    return [
        _rec("acc1", "behavior", "Predict the behavior.", "B", "B"),
        _rec("acc2", "behavior", "Predict the behavior.", "C", "A"),
        _rec("acc3", "prediction", "Is it moving?", "Yes.", "Yes."),
        _rec("acc4", "prediction", "Is it parked?", "No.", "Yes."),
        # identical answers without shared words across the two: BLEU 1..4 = 1, ROUGE-L 1, CIDEr 10
        _rec("lang1", "planning", "What actions?", "keep going straight slowly ahead", "keep going straight slowly ahead"),
        _rec("lang2", "perception", "What objects?", "two parked white trucks nearby", "two parked white trucks nearby"),
        _rec("m1", "prediction", "What to notice first?", REF_TAGS, PRED_TAGS),
        _rec("nolabel", "planning", "q", None, "p"),
    ]


def test_drivelm_scores_end_to_end_by_hand():
    judge = {"lang1": 80.0, "lang2": None, "m1": 60.0}
    s = drivelm_scores(_drivelm_records(), chatgpt_scores=judge)
    assert s["counts"] == {ACCURACY: 4, JUDGE: 3, LANGUAGE: 2, MATCH: 1}
    assert s["n"] == 8 and s["n_unscored"] == 1
    assert s["accuracy"] == pytest.approx(0.5)
    for n in range(1, 5):
        assert s[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["cider"] == pytest.approx(10.0)
    assert s["language"] == pytest.approx(1.0, abs=1e-6)
    assert s["match_f1"] == pytest.approx(100 / 3)
    assert s["match"] == pytest.approx((100 / 3 + 60.0) / 2)
    assert s["chatgpt"] == pytest.approx(80.0)
    assert (s["chatgpt_judged"], s["chatgpt_failed"]) == (1, 1)
    expected = 0.4 * 0.8 + 0.2 * 1.0 + 0.2 * (100 / 3 + 60.0) / 2 / 100 + 0.2 * 0.5
    assert s["final_score"] == pytest.approx(expected, abs=1e-6)
    assert s["counts_by_task"]["behavior"][ACCURACY] == 2


def test_drivelm_scores_without_judge_reports_partial_final():
    s = drivelm_scores(_drivelm_records())
    assert s["chatgpt"] is None and s["final_score"] is None
    assert s["match"] == pytest.approx(100 / 3)  # tag F1 only
    assert s["final_score_without_chatgpt"] == pytest.approx(0.2 * 1.0 + 0.2 / 3 + 0.2 * 0.5, abs=1e-6)
    assert any("no judge scores" in n for n in s["notes"])


def test_drivelm_scores_missing_category_gives_none():
    s = drivelm_scores([_rec("a", "behavior", "q", "A", "A")], chatgpt_scores={})
    assert s["accuracy"] == 1.0 and s["language"] is None and s["final_score"] is None


def test_squad_normalisation_and_token_f1():
    assert normalize_answer("The  Car, stops!") == "car stops"
    # pred "red car stops", ref "car stops now": common 2, P = 2/3, R = 2/3
    assert token_f1("A red car stops.", "The car stops now") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0


def test_local_scores_per_task_and_overall():
    recs = [
        {"key": "1", "task": "general", "prediction": "The car stops.", "reference": "the car stops"},
        {"key": "2", "task": "general", "prediction": "a red truck", "reference": "a blue truck"},
        {"key": "3", "task": "suggestion", "prediction": "slow down", "reference": "Slow down now"},
        {"key": "4", "task": "suggestion", "prediction": "x", "reference": None},
    ]
    s = local_scores(recs)
    assert set(s) == {"general", "suggestion", "overall"}
    assert s["general"]["n"] == 2 and s["suggestion"]["n"] == 1
    assert s["general"]["exact_match"] == pytest.approx(0.5)
    assert s["general"]["token_f1"] == pytest.approx((1.0 + 0.5) / 2)  # "red truck" vs "blue truck"
    assert s["suggestion"]["token_f1"] == pytest.approx(0.8)  # P 1, R 2/3
    assert s["overall"]["exact_match"] == pytest.approx(1 / 3)
    assert s["overall"]["n_unscored"] == 1
    # ROUGE-L of "slow down" vs "slow down now": P 1, R 2/3, beta 1.2
    assert s["suggestion"]["rouge_l"] == pytest.approx(2.44 * (2 / 3) / (2 / 3 + 1.44))
    assert set(s["overall"]) >= {"exact_match", "token_f1", "bleu_4", "rouge_l", "cider", "n"}


SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "drivelm_sample" / "QA_dataset_nus" / "train_sample.json"


@pytest.mark.skipif(not SAMPLE.is_file(), reason="DriveLM sample data (../shared) not present")
def test_real_drivelm_sample_perfect_answers():
    data = json.loads(SAMPLE.read_text())
    records = []
    for scene, sdata in data.items():
        for frame, fdata in sdata["key_frames"].items():
            for task, qas in fdata["QA"].items():
                for i, qa in enumerate(qas):
                    records.append(_rec(f"{frame}_{task}_{i}", task, qa["Q"], qa["A"], qa["A"]))
    s = drivelm_scores(records, chatgpt_scores={r["key"]: 100.0 for r in records})
    assert s["counts"][ACCURACY] > 0 and s["counts"][LANGUAGE] > 0 and s["counts"][MATCH] > 0
    assert s["counts_by_task"]["behavior"] == {ACCURACY: 9, JUDGE: 0, LANGUAGE: 0, MATCH: 0}  # 9 key frames
    assert s["accuracy"] == 1.0 and s["match_f1"] == pytest.approx(100.0) and s["rouge_l"] == pytest.approx(1.0)
    assert s["final_score"] > 0.9
