"""Benchmarks run (tiny sizes, one repeat) and report well-formed results; the peers compute the same function.

No timing assertions: timings on shared CI machines mean nothing.
"""

import json
import os
import sys

import pytest
import torch

# benchmarks/ is a top-level package of the repository, not part of the installed mose_lightning.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import moe_layer  # noqa: E402
from benchmarks.common import base_parser, benchmark_modules, time_interleaved  # noqa: E402


def test_moe_layer_json_structure(capsys):
    assert moe_layer.main(["--tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert result["benchmark"] == "moe_layer"
    for key in ("cpu_model", "torch_threads", "torch_version", "device"):
        assert key in result["machine"]
    assert list(result["results"]) == ["tiny"] and result["sizes"]["tiny"]["hidden"] == 16
    per_variant = result["results"]["tiny"]
    assert set(per_variant) == set(moe_layer.VARIANTS)
    for name, r in per_variant.items():
        assert r["median_s"] > 0 and r["ratio_vs_dense"] > 0
        assert r["min_s"] == pytest.approx(min(r["times_s"]), abs=1e-6)
        assert r["min_ratio_vs_dense"] == pytest.approx(r["min_s"] / per_variant["dense"]["min_s"])
    assert per_variant["dense"]["ratio_vs_dense"] == 1.0 and per_variant["dense"]["min_ratio_vs_dense"] == 1.0
    eq = result["equivalence"]["tiny"]
    assert eq["ok"] and set(eq["max_rel_error_vs_upcycled_ffn"]) == set(moe_layer.VARIANTS) - {"dense"}
    assert sum(result["routing"]["tiny"]["mose"]) == 4 * 8
    assert set(result["goals_met"]["tiny"]) == set(moe_layer.GOALS["cpu"])


def test_moe_layer_grouped_mm_variants_and_profile(capsys):
    """The *_grouped_mm variants (CUDA defaults, opt-in on CPU) run and check out; --profile keeps the costliest
    ops of one step per variant, after a total."""
    names = ",".join(moe_layer.GROUPED_VARIANTS)
    assert moe_layer.main(["--tiny", "--json", "--variants", names, "--profile", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["results"]["tiny"]) == {"dense", *moe_layer.GROUPED_VARIANTS}
    assert result["equivalence"]["tiny"]["ok"]
    assert sum(result["routing"]["tiny"]["mose_grouped_mm"]) == 4 * 8
    profile = result["profile"]["tiny"]
    assert set(profile) == {"dense", *moe_layer.GROUPED_VARIANTS}
    for ops in profile.values():
        assert len(ops) == 4 and ops[0]["name"].startswith("TOTAL")
        assert all(op["self_ms"] >= 0 and op["calls"] >= 1 for op in ops)
        assert ops[0]["self_ms"] >= max(op["self_ms"] for op in ops[1:])


def test_table_output(capsys):
    assert moe_layer.main(["--tiny", "--variants", "mose,gshard_einsum"]) == 0
    out = capsys.readouterr().out
    assert "mose" in out and "gshard_einsum" in out and "ratio_vs_dense" in out


def _blocks(hidden=16, inter=24, batch=3, seq=10):
    torch.manual_seed(0)
    base, variants, x, _ = moe_layer.build_variants(hidden, inter, batch, seq, torch.device("cpu"), torch.float32, "eager")
    return base, variants, x.detach()


@pytest.mark.parametrize("name", ["mose", "expert_group", "topk", "hf_qwen2_moe", "gshard_einsum"])
def test_peers_and_blocks_compute_the_upcycled_ffn_at_init(name):
    base, variants, x = _blocks()
    errors = moe_layer.check_equivalence(base, {name: variants[name]}, x)
    assert errors[name] < 1e-5


def test_gshard_and_hf_peers_match_the_topk_block_with_distinct_experts():
    """Beyond init: with randomised experts, the peers still compute the top-k block's function exactly."""
    base, variants, x = _blocks()
    topk = variants["topk"].module
    with torch.no_grad():
        topk.experts.gate_up_proj.normal_(std=0.3)
        topk.experts.down_proj.normal_(std=0.3)
        topk.router.gate.weight.normal_(std=0.5)
    with torch.no_grad():
        ref = topk(x)
        # GShard at a capacity that drops nothing: same routing, same experts, same combination.
        no_drop = moe_layer.GShardTop1MoE(topk, capacity_factor=moe_layer.NUM_EXPERTS)
        torch.testing.assert_close(no_drop(x), ref, rtol=1e-5, atol=1e-6)
        assert no_drop.last_dropped_fraction == 0.0
        # At factor 1.5 overflow tokens lose their routed half; kept tokens are unchanged.
        dropping = moe_layer.GShardTop1MoE(topk, capacity_factor=0.5)
        out = dropping(x)
        assert dropping.last_dropped_fraction > 0
        kept = (out - ref).abs().amax(-1) < 1e-6
        assert 0 < kept.sum() < kept.numel()
        # transformers' block with the top-k block's weights (down halved: its routed weight is 1, shared gate 0.5).
        hf = variants["hf_qwen2_moe"].module
        hf.gate.weight.copy_(topk.router.gate.weight)
        hf.experts.gate_up_proj.copy_(topk.experts.gate_up_proj)
        hf.experts.down_proj.copy_(0.5 * topk.experts.down_proj)
        torch.testing.assert_close(hf(x), ref, rtol=1e-5, atol=1e-6)


def test_every_variant_backpropagates_into_input_and_parameters():
    _, variants, _ = _blocks()
    x = torch.randn(3, 10, 16, requires_grad=True)
    for name, v in variants.items():
        x.grad = None
        for p in v.params:
            p.grad = None
        if hasattr(v.module, "route"):
            v.module.route(x)
        v.module(x).pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in v.params), name


def test_common_timer_interleaves_and_takes_medians():
    calls = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in rotated order
    assert set(out) == {"a", "b"} and all(len(v["times_s"]) == 3 and v["median_s"] >= 0 for v in out.values())


def test_benchmark_modules_follow_the_conventions():
    names = benchmark_modules()
    assert "moe_layer" in names and "common" not in names and "run_all" not in names
    for name in names:
        module = __import__(f"benchmarks.{name}", fromlist=["run", "main", "build_parser"])
        assert callable(module.run) and callable(module.main) and callable(module.build_parser), name
        args = module.build_parser().parse_args(["--tiny"])
        assert args.tiny and hasattr(args, "json")
    assert base_parser("x").parse_args([]).device == "cpu"


def test_run_all_writes_results(tmp_path, monkeypatch, capsys):
    from benchmarks import run_all

    assert run_all.main(["--only", "moe_layer", "--tiny", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "moe_layer.json").read_text())
    assert set(result["results"]["tiny"]) == set(moe_layer.VARIANTS)
    assert "moe_layer" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Model-level benchmarks (toy backbone, synthetic data in a temporary folder): one --tiny run each.


def _tiny_json(module, capsys, *extra):
    assert module.main(["--tiny", "--json", "--threads", "1", *extra]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert result["benchmark"] == module.NAME
    for key in ("cpu_model", "torch_threads", "torch_version", "device"):
        assert key in result["machine"]
    return result


def test_router_pretrain_benchmark_counts_forwards_with_a_hook(capsys):
    from benchmarks import router_pretrain

    result = _tiny_json(router_pretrain, capsys)
    cfg, res = result["config"], result["results"]
    n, epochs = cfg["train_samples"], cfg["epochs"]
    assert set(res) == {"cached", "uncached"} and epochs > 1
    # The cache runs the backbone once per sample; without it, once per sample per epoch (hook-counted).
    assert res["cached"]["backbone_forward_samples"] == n == res["cached"]["code_reported_forwards"]
    assert res["uncached"]["backbone_forward_samples"] == n * epochs
    assert result["cache_hit"]["forward_samples"] == 0 and result["cache_hit"]["same_features"]
    for r in res.values():
        assert r["median_s"] > 0 and 0.0 <= r["accuracy"]["mean"] <= 1.0
    assert res["uncached"]["ratio_vs_uncached"] == 1.0
    assert all(result["checks"].values()), result["checks"]


def test_generate_benchmark_makes_the_same_tokens(capsys):
    from benchmarks import generate

    result = _tiny_json(generate, capsys)
    res, cfg = result["results"], result["config"]
    assert set(res) == set(generate.VARIANTS)
    expected = cfg["batches"] * cfg["batch_size"] * cfg["max_new_tokens"]
    for r in res.values():
        assert r["new_tokens"] == expected and r["tokens_per_s"] > 0 and r["ratio_vs_dense"] > 0
    assert res["dense"]["ratio_vs_dense"] == 1.0
    # Routing decided on the prompt and reused (KV cache) == re-routing every step; MoSE == dense at init.
    assert result["token_agreement"]["mose_vs_mose_reroute"] == 1.0
    assert result["token_agreement"]["mose_vs_dense"] == 1.0
    assert result["token_agreement"]["expert_group_vs_dense"] == result["token_agreement"]["topk_vs_dense"] == 1.0
    # The activated-width dense reference computes the same function with FFNs twice as wide in the MoE layers.
    assert result["token_agreement"]["dense_activated_vs_dense"] == 1.0 and res["mose"]["ratio_vs_dense_activated"] > 0
    assert cfg["dense_activated_ffn_width"] == 2 * cfg["ffn_width"]
    assert cfg["layout"] == "paper" and cfg["moe_layers"] == [0, 2, 4] and cfg["num_layers"] == 6
    assert result["goal"]["mose_ratio_vs_dense_max"] == generate.GOAL_RATIO and result["checks"]["routing_reuse_matches_reroute"]


def test_datamodule_benchmark_reports_samples_per_second(capsys):
    from benchmarks import datamodule

    result = _tiny_json(datamodule, capsys)
    assert result["config"]["image_size"] == [800, 450]
    (r,) = result["results"].values()
    assert r["num_workers"] == 0 and r["samples"] == result["config"]["samples"] and r["samples_per_s"] > 0
    per = result["per_sample"]
    # The toy processor caps an image at 40 merged 28x28 cells: 800x450 -> 32 image tokens.
    assert per["image_tokens"] == 32 and per["sequence_length"] > per["image_tokens"]


def test_memory_benchmark_runs_each_variant_in_its_own_process(capsys):
    from benchmarks import memory

    result = _tiny_json(memory, capsys)
    res, children = result["results"], result["children"]
    assert set(res) == {"dense", "mose"}
    assert children["dense"]["batch"] == children["mose"]["batch"]
    # Same frozen parts; MoSE trains 4 experts + shared expert per layer where dense trains one FFN.
    assert children["dense"]["frozen_outside_moe_bytes"] == children["mose"]["frozen_outside_moe_bytes"]
    assert children["mose"]["trainable_params"] > 4 * children["dense"]["trainable_params"]
    for r in res.values():
        assert r["rss_before_mib"] > 0 and r["step1_peak_rss_delta_mib"] >= 0 and len(r["losses"]) == 2
    assert all(result["checks"].values()), result["checks"]


def test_routing_cost_benchmark_times_every_mechanism_against_the_reference(capsys):
    from benchmarks import routing_cost

    result = _tiny_json(routing_cost, capsys, "--variants", "first_moe_layer,frozen_backbone")
    assert list(result["results"]) == ["own_layer_frozen", "first_moe_layer", "frozen_backbone"]
    assert result["results"]["own_layer_frozen"]["step_ratio"] == 1.0
    for r in result["results"].values():
        assert r["step_median_s"] > 0 and r["prefill_median_s"] > 0


def test_train_step_benchmark_compares_mose_with_dense_sft_on_random_weights(capsys):
    from benchmarks import train_step

    result = _tiny_json(train_step, capsys)
    assert list(result["results"]) == ["dense", "mose"]  # FSDP on one device only on CUDA
    dense, mose = result["results"]["dense"], result["results"]["mose"]
    assert dense["moe_layers"] == [] and mose["moe_layers"] and dense["step_ratio_vs_dense"] == 1.0
    assert mose["trainable_params"] > dense["trainable_params"] > 0
    for r in (dense, mose):
        assert r["tokens_per_s"] > 0 and r["seconds_per_new_token"] > 0


def test_view_routing_benchmark_encodes_and_shows_the_views_of_each_mode(capsys):
    from benchmarks import view_routing

    result = _tiny_json(view_routing, capsys)
    toy = result["results"]["toy"]
    assert list(toy) == list(view_routing.MODES)
    # The toy's image is 32 tokens; six cameras, CAM_FRONT kept. A routed or labelled mode adds at most its top-k
    # views (none where the router says NONE or the label is CAM_FRONT itself).
    for mode, (least, most) in {"all": (6, 6), "kept": (1, 1), "routed1": (1, 2), "routed2": (1, 3),
                                "labels": (1, 2)}.items():
        assert 32 * least <= toy[mode]["image_tokens_per_sample"] <= 32 * most, mode
        assert least <= toy[mode]["images_encoded_per_sample"] <= most, mode
    assert toy["all"]["speedup_vs_all"] == 1.0
    for mode, q in result["quality"].items():
        assert q["needs_other_view"]["n"] + q["kept_views_suffice"]["n"] == 8, mode
        assert 0.0 <= q["needs_other_view"]["token_f1"]["mean"] <= 1.0
