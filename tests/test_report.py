"""Results files, run comparison, plots and the HTML report."""

import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from mose_lightning.evaluation import plots
from mose_lightning.evaluation.html_report import select_samples, write_html_report
from mose_lightning.evaluation.report import (
    coda_overall,
    compare_runs,
    format_params,
    load_results,
    main,
    run_label,
    write_results,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _coda(general, regional, suggestion):
    return {
        "general": {"score": general, "n_judged": 50, "n_failed": 0},
        "regional": {"score": regional, "n_judged": 120, "n_failed": 2},
        "suggestion": {"mean_rating": suggestion / 10.0, "n_judged": 49, "n_failed": 1},
        "regional_by_class": {"vru": {"score": 70.0, "n_judged": 10, "n_failed": 0}, "vehicle": 65.0},
    }


def _meta(kind, seed=0, **extra):
    meta = {"moe_kind": kind, "num_experts": 4, "top_k": 1, "activated_params": 2_210_000_000,
            "total_params": 2_800_000_000, "seed": seed}
    meta.update(extra)
    return meta


def test_labels_and_params():
    assert run_label({"moe_kind": "dense"}) == "SFT"
    assert run_label({"moe_kind": "topk", "num_experts": 8, "top_k": 1}) == "MoE 8x1"
    assert run_label({"moe_kind": "mose"}) == "MoSE"
    assert run_label({"moe_kind": "expert_group"}) == "MoSE + expert groups"
    assert run_label({"moe_kind": "mose", "method": "Mine"}) == "Mine"
    assert format_params(2_210_000_000) == "2.21B"
    assert format_params(83_000_000) == "83.0M"
    assert format_params(None) == "-"


def test_write_results_tables(tmp_path):
    scores = {
        "coda": _coda(58.1, 71.1, 68.9),
        "local": {"general": {"exact_match": 0.5, "token_f1": 0.25, "bleu_4": 0.1, "rouge_l": 0.3, "cider": 1.5, "n": 4},
                  "overall": {"exact_match": 0.5, "token_f1": 0.25, "bleu_4": 0.1, "rouge_l": 0.3, "cider": 1.5,
                              "n": 4, "n_unscored": 0}},
        "drivelm": {"final_score": None, "final_score_without_chatgpt": 0.3, "accuracy": 0.5, "language": 0.4,
                    "match": 30.0, "chatgpt": None, "counts": {"accuracy": 2}, "notes": ["no judge scores given"]},
    }
    out = write_results(tmp_path, scores, _meta("mose"))
    md = out.read_text()
    assert coda_overall(scores["coda"]) == pytest.approx((58.1 + 71.1 + 68.9) / 3)
    assert "| Method | Activated params | General | Regional | Suggestion | Score |" in md
    assert "| MoSE | 2.21B | 58.10 | 71.10 | 68.90 | 66.03 |" in md
    assert "Regional 120 judged / 2 failed" in md
    # super-classes in the canonical order: vehicle before vru
    assert md.index("| vehicle |") < md.index("| vru |")
    assert "| overall | 4 | 50.00 | 25.00 | 10.00 | 30.00 | 1.500 |" in md
    assert "0.3000 (out of 0.6)" in md
    loaded_scores, loaded_meta = load_results(tmp_path)
    assert loaded_meta["moe_kind"] == "mose" and loaded_scores["coda"]["general"]["score"] == 58.1
    assert not list(tmp_path.glob(".*.tmp"))


def test_compare_runs_mean_std_over_seeds(tmp_path, capsys):
    dirs = []
    for i, (kind, g, seed) in enumerate([("dense", 52.7, 0), ("mose", 50.0, 0), ("mose", 54.0, 1)]):
        d = tmp_path / f"run{i}"
        write_results(d, {"coda": _coda(g, 70.0, 60.0)}, _meta(kind, seed))
        dirs.append(str(d))
    md = compare_runs(dirs)
    assert "| Method | Activated params | Total params | Runs | CODA General |" in md
    assert "| SFT | 2.21B | 2.80B | 1 | 52.70 |" in md
    # seeds 50 and 54: mean 52, sample std sqrt(8) = 2.83
    assert f"| MoSE | 2.21B | 2.80B | 2 | 52.00 ± {math.sqrt(8):.2f} |" in md
    assert "DriveLM" not in md  # columns without any value are left out

    out = tmp_path / "cmp.md"
    assert main(dirs + ["--out", str(out)]) == 0
    assert out.read_text() == md
    assert "MoSE" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    assert "no scores.json" in capsys.readouterr().err


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_MAGIC


def test_expert_weight_similarity_on_hand_made_weights():
    # experts 0 and 1 identical, expert 2 orthogonal to both, expert 3 = -expert 0
    up = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]],
                       [[-1.0, 0.0], [0.0, 0.0]]])
    down = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])
    sim = plots.expert_weight_similarity([up, down])
    expected = np.array([[1, 1, 0, -1], [1, 1, 0, -1], [0, 0, 1, 0], [-1, -1, 0, 1]], dtype=float)
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    # scale does not matter, and plain arrays work too
    np.testing.assert_allclose(plots.expert_weight_similarity([np.array([[1.0, 1.0], [3.0, 3.0]])]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="number of experts"):
        plots.expert_weight_similarity([torch.zeros(2, 3), torch.zeros(3, 3)])


def test_plots_write_pngs(tmp_path):
    records = [
        {"task": "general", "skill_chain": [
            {"layer": 0, "level": "perception", "expert": 0, "skill": "general", "prob": 0.9},
            {"layer": 2, "level": "perception", "expert": 1, "skill": "region_object", "prob": 0.6},
            {"layer": 4, "level": "perception", "expert": 1, "skill": "region_object", "prob": 0.7},
            {"layer": 6, "level": "planning", "expert": 2, "skill": "caution", "prob": 0.8}]},
        {"task": "regional", "skill_chain": []},
    ]
    assert plots.predicted_chain(records[0]["skill_chain"]) == "region_object > caution"
    paths = [
        plots.plot_skill_chain_frequency(records, tmp_path / "chains.png"),
        plots.plot_skill_chain_frequency([{"task": "x", "skill_chain": []}], tmp_path / "empty.png"),
        plots.plot_expert_usage(np.array([[3, 1], [0, 4]]), ["L0 perception", "L2 planning"], tmp_path / "use.png"),
        plots.plot_weight_similarity(np.eye(3), ["e0", "e1", "e2"], tmp_path / "sim.png", transform="log"),
        plots.plot_data_scaling({"MoE": {0.25: (50.0, 1.0), 0.5: (55.0, 0.5), 1.0: (55.0, 0.7)},
                                 "MoSE": {0.25: (52.0, 1.0), 1.0: (60.0, 0.0)}}, tmp_path / "scale.png"),
    ]
    for p in paths:
        assert _is_png(p), p
    fig = plots.expert_usage_figure(np.ones((2, 3)), ["a", "b"])
    assert fig.axes  # usable with SummaryWriter.add_figure
    with pytest.raises(ValueError, match="layer labels"):
        plots.expert_usage_figure(np.ones((2, 3)), ["a"])


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.imgs = [], []

    def handle_data(self, data):
        self.text.append(data)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])


def test_html_report_escapes_and_parses(tmp_path):
    from PIL import Image

    (tmp_path / "thumbs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "thumbs" / "s0.png")
    records = [
        {"key": "s0", "dataset": "drivelm", "task": "prediction",
         "question": "Is <c1,CAM_BACK,1.0,2.0> moving & close?", "reference": "Yes.", "prediction": "<b>No</b>",
         "category": None, "skills": {"perception": "region_object"},
         "skill_chain": [{"layer": 0, "level": "perception", "expert": 1, "skill": "region_object", "prob": 0.75}],
         "images": ["thumbs/s0.png", "thumbs/missing.jpg"]},
        {"key": "s1", "dataset": "drivelm", "task": "planning", "question": "q", "reference": None,
         "prediction": "p", "category": None, "skills": None, "skill_chain": [], "images": []},
    ]
    scores = {"local": {"overall": {"exact_match": 0.0, "token_f1": 0.0, "bleu_4": 0.0, "rouge_l": 0.0,
                                    "cider": 0.0, "n": 1}}}
    path = write_html_report(tmp_path, records, scores, ratings={"s0": 7, "s1": None}, max_samples=10)
    raw = path.read_text()
    assert "Is &lt;c1,CAM_BACK,1.0,2.0&gt; moving &amp; close?" in raw
    assert "&lt;b&gt;No&lt;/b&gt;" in raw and "<b>No</b>" not in raw
    parser = _Collect()
    parser.feed(raw)
    parser.close()
    text = "".join(parser.text)
    assert "Is <c1,CAM_BACK,1.0,2.0> moving & close?" in text
    assert "layer 0: perception/region_object (0.75)" in text
    assert "judge failed" in text and "Local metrics" in text
    assert parser.imgs[0].startswith("data:image/png;base64,")  # small image embedded
    assert parser.imgs[1] == "thumbs/missing.jpg"  # otherwise linked relative to the run dir


def test_select_samples_round_robin_over_tasks():
    recs = [{"key": i, "task": t} for i, t in enumerate(["a", "a", "a", "b", "c"])]
    assert [r["key"] for r in select_samples(recs, 4)] == [0, 3, 4, 1]
