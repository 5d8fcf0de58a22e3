"""The planner's parts against independent expectations: flow matching and Euler integration on hand-computed
cases, the Action MoE's routing and experts, the focal loss, both L2 conventions and the safety proxy on
hand-made trajectories, the planning fields of the sample format, the synthetic trajectories, attaching nuScenes
ego poses to DriveLM samples, and a planner head that learns a small mapping."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mose_lightning.config import ConfigError, load_config
from mose_lightning.data.sample import Sample, SampleError, encode_jpeg, validate
from mose_lightning.evaluation.planning_metrics import (
    displacement_errors, l2_stp3_avg, l2_uniad_at_t, planning_scores, rare_classes, subset_metrics)
from mose_lightning.moe.losses import focal_loss, inverse_frequency_alpha
from mose_lightning.planning.action_moe import ActionMoE, ActionRoute, ActionRouter
from mose_lightning.planning.flow_matching import FlowMatching
from mose_lightning.planning.geometry import box_corners, quads_overlap, sweep_obstacles
from mose_lightning.planning.planner import PlannerHead, PlannerSpec


# ---- flow matching --------------------------------------------------------------------------------------------
def test_flow_matching_interpolation_target_and_loss_by_hand():
    flow = FlowMatching(sigma_min=0.001)
    noise = torch.tensor([[[1.0, -2.0]], [[0.0, 0.0]]])
    action = torch.tensor([[[3.0, 4.0]], [[1.0, 1.0]]])
    t = torch.tensor([0.5, 0.25])
    # x_t = (1 - 0.999 t) x0 + t x1: sample 0 -> 0.5005 * (1, -2) + 0.5 * (3, 4)
    assert torch.allclose(flow.interpolate(noise, action, t)[0], torch.tensor([[2.0005, 0.999]]), atol=1e-6)
    # target = x1 - 0.999 x0
    assert torch.allclose(flow.target(noise, action)[0], torch.tensor([[2.001, 5.998]]), atol=1e-6)
    velocity = torch.tensor([[[1.0, 5.0]], [[9.0, 9.0]]])
    # sample 0 errors (-1.001, -0.998): mean of squares = (1.002001 + 0.996004) / 2
    only_first = flow.loss(velocity, noise, action, torch.tensor([1.0, 0.0]))
    assert only_first.item() == pytest.approx(0.9990025, abs=1e-6)
    # sample 1 errors (8, 8): 64; unweighted mean over both samples
    assert flow.loss(velocity, noise, action).item() == pytest.approx((0.9990025 + 64.0) / 2, abs=1e-5)
    assert flow.loss(velocity, noise, action, torch.zeros(2)).item() == 0.0


def test_euler_integration_of_known_velocity_fields():
    flow = FlowMatching(steps=10)
    x0 = torch.zeros(1, 1)
    # dx/dt = -0.5 x + 1 with steps of 0.1: x_{k+1} = 0.95 x_k + 0.1, so x_10 = 2 (1 - 0.95^10)
    out = flow.integrate(lambda x, t: -0.5 * x + 1.0, x0)
    assert out.item() == pytest.approx(2 * (1 - 0.95**10), abs=1e-6)
    # dx/dt = t evaluated at the left end of each step: 0.1 * (0 + 0.1 + ... + 0.9) = 0.45 (not the exact 0.5)
    assert flow.integrate(lambda x, t: t.view(-1, 1), x0).item() == pytest.approx(0.45, abs=1e-6)


def test_euler_on_the_exact_conditional_field_lands_on_sigma_x0_plus_x1():
    flow = FlowMatching(sigma_min=0.001, steps=10)
    x1 = torch.tensor([[3.0, -1.0]])
    x0 = torch.tensor([[0.4, 2.0]])

    def exact(x, t):  # the velocity of the straight path through x at time t towards x1
        t = t.view(-1, 1)
        noise = (x - t * x1) / (1 - (1 - flow.sigma_min) * t)
        return x1 - (1 - flow.sigma_min) * noise

    assert torch.allclose(flow.integrate(exact, x0), flow.sigma_min * x0 + x1, atol=1e-5)


def test_time_sampling_follows_beta_1_5_1_scaled_by_0_999():
    torch.manual_seed(0)
    t = FlowMatching().sample_time(200_000)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 0.999
    # t = 0.999 (1 - z), z ~ Beta(1.5, 1): E[t] = 0.999 * (1 - 0.6); P(t <= 0.5) = 1 - (1 - 0.5 / 0.999)^1.5
    assert float(t.mean()) == pytest.approx(0.3996, abs=0.003)
    assert float((t <= 0.5).float().mean()) == pytest.approx(1 - (1 - 0.5 / 0.999) ** 1.5, abs=0.004)


# ---- Action MoE ---------------------------------------------------------------------------------------------------
def test_trajectory_level_route_is_the_mean_of_the_token_logits():
    torch.manual_seed(0)
    router = ActionRouter(8, 5, 2, "trajectory")
    h = torch.randn(3, 7, 8)
    token = router.token_logits(h)
    route = router(h, horizon_start=1)
    assert torch.allclose(route.logits, token[:, 1:].mean(dim=1), atol=1e-6)
    with torch.no_grad():
        router.log_temperature.fill_(math.log(2.0))
    assert torch.allclose(router(h, 1).logits, token[:, 1:].mean(dim=1) / 2, atol=1e-6)
    # One decision per trajectory: every token gets the top-2 of softmax(mean logits), renormalised.
    probs = route.logits.softmax(-1)
    top_p, top_i = probs.topk(2, dim=-1)
    assert torch.equal(route.expert_index, top_i.unsqueeze(1).expand(-1, 7, -1))
    assert torch.allclose(route.weights, (top_p / top_p.sum(-1, keepdim=True)).unsqueeze(1).expand(-1, 7, -1))
    token_route = ActionRouter(8, 5, 2, "token")
    with torch.no_grad():
        token_route.gate.weight.copy_(router.gate.weight)
    assert torch.equal(token_route(h, 1).expert_index, token.topk(2, dim=-1).indices)


def test_planner_reuses_one_trajectory_route_in_every_moe_layer():
    torch.manual_seed(0)
    spec = PlannerSpec(context_size=8, horizon=4, history=2, hidden_size=16, intermediate_size=32, num_layers=3,
                       num_heads=2, routing="trajectory", moe_layers=2, num_experts=4, top_k=2)
    head = PlannerHead(spec)
    moe_layers = [layer.ffn for layer in head.layers if layer.is_moe]
    assert len(moe_layers) == 2
    seen = []
    for moe in moe_layers:  # what each layer's experts are called with
        moe.experts.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    out = head.velocity(torch.randn(5, 4, 2), torch.rand(5), head.encode_context(torch.randn(5, 3, 8)),
                        torch.ones(5, 3, dtype=torch.bool), torch.zeros(5, 12))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and torch.equal(seen[0], out.route.expert_index)
    # 5 trajectories x 5 tokens (state + 4 waypoints) x top-2, every token of a trajectory to the same experts
    assert seen[0].shape == (5, 5, 2) and bool((seen[0] == seen[0][:, :1]).all())


def test_planner_statistics_stay_float32_when_the_head_is_cast_to_bf16():
    spec = PlannerSpec(context_size=8, horizon=2, history=1, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, routing="trajectory", moe_layers=1, num_experts=2, top_k=1)
    head = PlannerHead(spec)
    head.set_statistics(torch.tensor([[0.0, -3.3]]), torch.tensor([[30.123, 3.3]]), torch.zeros(9), torch.ones(9))
    head.to(torch.bfloat16)
    assert head.action_out.weight.dtype == torch.bfloat16 and head.action_high.dtype == torch.float32
    assert head.action_high[0, 0].item() == pytest.approx(30.123, abs=1e-5)
    out = head.sample(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 9), FlowMatching(steps=2))
    assert out.trajectory.shape == (2, 2, 2) and out.trajectory.dtype == torch.float32


def test_action_moe_adds_the_shared_expert_unweighted_to_the_weighted_chosen_swiglu_experts():
    torch.manual_seed(0)
    moe = ActionMoE(6, 10, 3)
    x = torch.randn(1, 4, 6)
    index = torch.tensor([[[0, 2], [1, 1], [2, 0], [1, 0]]])
    weights = torch.tensor([[[0.7, 0.3], [0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]])
    out = moe(x, ActionRoute(index, weights))
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    shared = moe.experts.shared
    for row in range(4):
        h = x[0, row]
        expected = shared.down_proj.weight @ (torch.nn.functional.silu(shared.gate_proj.weight @ h) * (shared.up_proj.weight @ h))
        for j in range(2):
            e = int(index[0, row, j])
            gate, up = (gate_up[e] @ h).chunk(2)
            expected += weights[0, row, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        assert torch.allclose(out[0, row], expected, atol=1e-5)


def test_mose_chain_expert_is_the_last_planning_level_route_of_the_forward():
    from mose_lightning.moe.routing import RouteDecision
    from mose_lightning.planning.vlm import planning_route

    def route(layer, level, experts):
        expert = torch.tensor(experts)
        return RouteDecision(layer, level, expert, torch.zeros(len(experts), 4), torch.zeros(len(experts), 8))

    routes = [route(0, "perception", [3, 3]), route(4, "planning", [1, 0]), route(5, "planning", [2, 1]),
              route(6, "prediction", [0, 0])]
    assert planning_route(routes, "planning").tolist() == [2, 1]
    assert planning_route(routes, "perception").tolist() == [3, 3]
    assert planning_route(routes[:1], "planning") is None


# ---- focal loss ---------------------------------------------------------------------------------------------------
def test_focal_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    target = torch.tensor([0, 2, -1])  # the third row is unlabelled
    alpha = torch.tensor([0.5, 0.25, 0.25])
    # row 0: p = e^2 / (e^2 + 2) = 0.786986, -0.5 (1 - p)^2 ln p = 0.0054347
    # row 1: p = 1 / (2 + e) = 0.211942, -0.25 (1 - p)^2 ln p = 0.2408758
    assert focal_loss(logits, target, 2.0, alpha, ignore_index=-1).item() == pytest.approx((0.0054347 + 0.2408758) / 2, abs=1e-6)
    assert focal_loss(logits, target, 2.0, alpha, "sum", ignore_index=-1).item() == pytest.approx(0.0054347 + 0.2408758, abs=1e-6)
    assert focal_loss(logits, target, 2.0, alpha, "none", ignore_index=-1).tolist() == pytest.approx([0.0054347, 0.2408758, 0.0], abs=1e-6)
    # gamma 0 without alpha is the cross-entropy (which ignores the same rows)
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-1)
    assert focal_loss(logits, target, 0.0, ignore_index=-1).item() == pytest.approx(ce.item(), abs=1e-6)
    # an absent class weighs as much as the rarest seen one: inverses 1, 1/3, 1 over their sum 7/3
    assert inverse_frequency_alpha([1, 3, 0]).tolist() == pytest.approx([3 / 7, 1 / 7, 3 / 7])


def test_focal_loss_without_a_labelled_row_is_zero_and_still_backpropagates():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = focal_loss(logits, torch.full((3,), -1), 2.0, torch.full((4,), 0.25), ignore_index=-1)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(3, 4))


# ---- metrics -------------------------------------------------------------------------------------------------------
def _hand_trajectory():
    reference = np.stack([np.arange(1, 7) * 4.0, np.zeros(6)], axis=-1)
    # 3-4-5 offsets: L2 errors 1, 2, ..., 6 m at 0.5, 1.0, ..., 3.0 s
    prediction = reference + np.array([[0.6 * k, 0.8 * k] for k in range(1, 7)])
    return prediction, reference


def test_both_l2_conventions_on_a_hand_computed_trajectory():
    prediction, reference = _hand_trajectory()
    errors = displacement_errors(prediction[None], reference[None])
    assert np.allclose(errors, [[1, 2, 3, 4, 5, 6]])
    # UniAD at t: the waypoint at 1, 2, 3 s (indices 1, 3, 5)
    assert l2_uniad_at_t(errors, 2.0) == pytest.approx({"1s": 2.0, "2s": 4.0, "3s": 6.0, "avg": 4.0})
    # ST-P3: the mean over the waypoints up to t
    assert l2_stp3_avg(errors, 2.0) == pytest.approx({"1s": 1.5, "2s": 2.5, "3s": 3.5, "avg": 2.5})
    m = subset_metrics([{"prediction": prediction.tolist(), "reference": reference.tolist()}], 2.0)
    assert m["ade"] == pytest.approx(3.5) and m["fde"] == pytest.approx(6.0)
    # At 1 Hz the waypoint at 1 s is the first one.
    assert l2_uniad_at_t(errors[:, :3], 1.0) == pytest.approx({"1s": 1.0, "2s": 2.0, "3s": 3.0, "avg": 2.0})


def test_collision_and_stop_zone_proxy():
    straight = [[2.0 * k, 0.0] for k in range(1, 7)]  # 4 m/s, waypoints every 0.5 s
    box = {"kind": "object", "center": [10.0, 0.0], "size": [2.0, 2.0]}
    collision, stop = sweep_obstacles(straight, 2.0, [box])
    # the ego front (centre + 2.04 m) passes x = 9 when the centre passes 6.96 m: in the interval to 8 m (2 s)
    assert collision.tolist() == [False, False, False, True, True, True] and not stop.any()
    assert not sweep_obstacles([[x, 3.0] for x, _ in straight], 2.0, [box])[0].any()  # one lane over
    zone = {"kind": "stop_zone", "center": [11.0, 0.0], "size": [4.0, 3.5]}
    collision, stop = sweep_obstacles(straight, 2.0, [zone])
    assert not collision.any() and stop.tolist() == [False, False, False, True, True, True]
    moving = {"kind": "object", "center": [10.0, 0.0], "size": [2.0, 2.0], "velocity": [4.0, 0.0]}
    assert not sweep_obstacles(straight, 2.0, [moving])[0].any()  # the lead keeps its gap
    # Rotated boxes: the 45-degree ego box's bounds overlap the box below, the boxes themselves do not.
    ego = box_corners(np.zeros((1, 2)), np.array([math.pi / 4]), 4.08, 1.85)
    apart = box_corners(np.array([[2.4, -1.0]]), np.zeros(1), 1.0, 1.0)
    touching = box_corners(np.array([[1.7, 0.3]]), np.zeros(1), 1.0, 1.0)
    assert not quads_overlap(ego, apart)[0] and quads_overlap(ego, touching)[0]


def test_planning_scores_split_rare_classes_and_detours():
    prediction, reference = _hand_trajectory()
    left = np.stack([np.arange(1, 7) * 4.0, np.linspace(0.5, 3.5, 6)], axis=-1)
    records = [
        {"prediction": reference.tolist(), "reference": reference.tolist(), "scenario": "normal", "skill": "general"},
        {"prediction": prediction.tolist(), "reference": reference.tolist(), "scenario": "give_way", "skill": "stop_or_yield"},
        {"prediction": (left * [1, -1]).tolist(), "reference": left.tolist(), "scenario": "overtaking", "skill": "manoeuvre"},
        {"prediction": (left * [1, 0]).tolist(), "reference": left.tolist(), "scenario": "overtaking", "skill": "manoeuvre"},
    ]
    counts = {"normal": 80, "give_way": 5, "overtaking": 15}
    assert rare_classes(counts, 0.1) == ["give_way"]
    scores = planning_scores(records, 2.0, counts, 0.1)
    assert scores["rare"]["n"] == 1 and scores["rare"]["ade"] == pytest.approx(3.5)
    assert scores["common"]["n"] == 3 and scores["by_scenario"]["normal"]["ade"] == 0.0
    overtaking = scores["by_scenario"]["overtaking"]
    assert overtaking["detour_n"] == 2 and overtaking["detour_side_correct"] == 0.0
    assert overtaking["detour_undecided"] == 0.5  # the one that drives straight
    assert "n_safety_checked" in scores["all"] and scores["all"]["n_safety_checked"] == 0  # no obstacles given


# ---- the sample format's planning fields ---------------------------------------------------------------------
def _sample(planning, key="k1"):
    from PIL import Image

    return Sample(key=key, dataset="drivelm", task="planning", question="What should the ego car do?", answer="Go.",
                  views=["CAM_FRONT"], images=[encode_jpeg(Image.new("RGB", (16, 9)))], source={}, planning=planning)


GOOD = {"trajectory": [[1.0, 0.0], [2.0, 0.1]], "rate_hz": 2.0, "history": [[-1.0, 0.0]], "speed": 2.0,
        "command": "straight", "scenario": None}


@pytest.mark.parametrize("field, value, message", [
    ("trajectory", [[1.0, 0.0, 3.0]], "planning.trajectory"),
    ("trajectory", [[float("nan"), 0.0]], "planning.trajectory"),
    ("trajectory", [], "planning.trajectory"),
    ("rate_hz", 0, "planning.rate_hz"),
    ("rate_hz", float("inf"), "planning.rate_hz"),
    ("history", [[1.0]], "planning.history"),
    ("speed", -1.0, "planning.speed"),
    ("command", "uturn", "planning.command"),
    ("scenario", "parking", "planning.scenario"),
    ("obstacles", [{"kind": "object", "center": [1, 2], "size": [0, 1]}], "planning.obstacles[0]"),
    ("typo", 1, "planning"),
])
def test_bad_planning_fields_name_the_sample_and_field(field, value, message):
    planning = dict(GOOD, **{field: value})
    with pytest.raises(SampleError, match=rf"sample 'k7'.*`{re.escape(message)}`"):
        validate(_sample(planning, "k7"))


def test_planning_round_trips_and_absent_planning_keeps_the_bytes():
    sample = _sample(GOOD)
    again = Sample.from_record(sample.to_record())
    assert again.planning == GOOD and "planning" not in again.extra
    plain = _sample(None)
    assert b'"planning":' not in plain.to_record()["json"]


def test_resampling_to_the_configured_rate_and_horizon(make_config):
    from mose_lightning.data.planning import PlanTargetSpec, planning_tensors

    cfg = make_config("plan.horizon=3", "plan.rate_hz=2.0", "plan.history=2")
    spec = PlanTargetSpec.from_config(cfg, None)
    at4hz = dict(GOOD, rate_hz=4.0, trajectory=[[k * 1.0, 0.0] for k in range(1, 9)],
                 history=[[-k * 1.0, 0.0] for k in range(5, 0, -1)])
    tensors = planning_tensors(_sample(at4hz), spec)
    # every second waypoint: t = 0.5, 1.0, 1.5 s; history at -1.0 and -0.5 s
    assert tensors["plan_trajectory"][0, :, 0].tolist() == [2.0, 4.0, 6.0]
    assert tensors["plan_state"][0, :4].tolist() == [-4.0, 0.0, -2.0, 0.0]
    with pytest.raises(SampleError, match=r"sample 'k1'.*rate_hz=3 cannot give waypoints at plan.rate_hz=2"):
        planning_tensors(_sample(dict(GOOD, rate_hz=3.0)), spec)
    with pytest.raises(SampleError, match=r"sample 'k1'.*has 2 waypoints at 2 Hz, plan.horizon=3"):
        planning_tensors(_sample(GOOD), spec)
    assert planning_tensors(_sample(None), spec)["plan_valid"].item() == 0.0


def test_plan_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="plan.routing"):
        load_config(None, ["plan.routing=everything"])
    with pytest.raises(ConfigError, match="plan.moe_layers"):
        load_config(None, ["plan.num_layers=2", "plan.moe_layers=3"])
    with pytest.raises(ConfigError, match="plan.cache_features"):
        load_config(None, ["plan.train_vlm=true", "plan.cache_features=true"])


# ---- synthetic trajectories ------------------------------------------------------------------------------------
def test_synthetic_trajectories_follow_the_scene_roles():
    from data_recipes.synthetic import ROLE_SCENARIO, make_sample

    seen_sides, both = set(), 0
    for i in range(150):
        sample = make_sample("train", i, 0, trajectories=True)
        validate(sample)
        p = sample.planning
        role = sample.source["key_objects"][0] if sample.source["key_objects"] else "clear"
        assert p["scenario"] == ROLE_SCENARIO.get(role, "normal")
        traj = np.array(p["trajectory"])
        collision, stop = sweep_obstacles(traj, p["rate_hz"], p["obstacles"])
        assert not collision.any() and not stop.any(), sample.key  # the ground truth keeps clear
        steps = np.diff(np.vstack([[0.0, 0.0], traj])[:, 0])
        if role in ("red_light", "stop_sign", "ped_crossing", "car_cut_in"):
            assert steps[-1] < steps[0] - 0.3, sample.key  # braking
            assert p["command"] == "straight"
        if role in ("barrier_block", "cones_block", "debris_block"):
            assert p["command"] == sample.source["manoeuvre_side"]
            assert np.sign(traj[-1, 1]) == (1 if p["command"] == "left" else -1), sample.key
            assert f"change to the {p['command']} lane" in sample.answer  # the texts name the side driven
            seen_sides.add(p["command"])
            both += 1
        if role in ("clear", "green_light") and len(sample.source["key_objects"]) <= 1:
            # constant speed within +-0.3 m/s^2 and 5 cm of noise, in the lane
            assert np.allclose(steps, p["speed"] / 2, atol=0.6) and abs(traj[-1, 1]) < 0.3, sample.key
    assert both >= 10 and seen_sides == {"left", "right"}  # genuinely bimodal detours
    plain = make_sample("train", 7, 0)
    assert plain.planning is None and plain.images == make_sample("train", 7, 0, trajectories=True).images


def test_perception_family_takes_the_trajectory_option_too():
    from data_recipes.synthetic import make_sample

    for i in range(6):
        with_plan = make_sample("val", i, 3, family="perception", trajectories=True)
        plain = make_sample("val", i, 3, family="perception")
        assert with_plan.task in ("objects", "locate") and with_plan.skills is None
        assert plain.planning is None and len(with_plan.planning["trajectory"]) == 6
        assert with_plan.images == plain.images and with_plan.key == plain.key


# ---- nuScenes ego poses ------------------------------------------------------------------------------------------
def _nuscenes_tables(folder: Path) -> None:
    """One scene of 10 key frames 0.5 s apart (one gap of 0.8 s before the last), the ego heading along global +y
    (yaw 90 degrees) and drifting towards global -x, i.e. to its left: at key frame k it is at (10 - 0.5k, 20 + 2.5k)."""
    q = [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]
    times = [0.5 * k for k in range(9)] + [4.0 + 0.8]
    samples, sample_data, poses = [], [], []
    for k, t in enumerate(times):
        token = f"s{k}"
        samples.append({"token": token, "timestamp": int(t * 1e6), "scene_token": "scene0",
                        "prev": f"s{k - 1}" if k else "", "next": f"s{k + 1}" if k < len(times) - 1 else ""})
        poses.append({"token": f"p{k}", "timestamp": int(t * 1e6), "rotation": q, "translation": [10 - 0.5 * k, 20 + 2.5 * k, 0.0]})
        sample_data.append({"token": f"d{k}", "sample_token": token, "ego_pose_token": f"p{k}", "is_key_frame": True,
                            "filename": f"samples/LIDAR_TOP/{token}.pcd.bin", "timestamp": int(t * 1e6)})
        # A camera record with another pose: the LiDAR's must be the one used.
        poses.append({"token": f"c{k}", "timestamp": int(t * 1e6), "rotation": q, "translation": [0.0, 0.0, 0.0]})
        sample_data.append({"token": f"e{k}", "sample_token": token, "ego_pose_token": f"c{k}", "is_key_frame": True,
                            "filename": f"samples/CAM_FRONT/{token}.jpg", "timestamp": int(t * 1e6)})
    folder.mkdir(parents=True)
    for name, rows in (("sample", samples), ("sample_data", sample_data), ("ego_pose", poses)):
        (folder / f"{name}.json").write_text(json.dumps(rows))


def test_nuscenes_ego_poses_become_ego_frame_waypoints(tmp_path):
    from data_recipes.nuscenes_ego import attach_ego_trajectories
    from mose_lightning.data.shards import ShardWriter, iter_samples

    _nuscenes_tables(tmp_path / "v1.0-mini")
    with ShardWriter(tmp_path / "drivelm", prefix="shard") as writer:
        for token in ("s2", "s5", "s3", "unknown"):
            sample = _sample(None, key=f"q_{token}")
            sample.source = {"frame_token": token}
            writer.write(sample)
    report = attach_ego_trajectories(str(tmp_path / "drivelm"), tmp_path / "v1.0-mini", tmp_path / "out")
    out = {s.key: s.planning for s in iter_samples(str(tmp_path / "out"))}
    p = out["q_s2"]
    # forward = global +y (2.5 m per key frame), left = global -x (0.5 m per key frame)
    assert np.allclose(p["trajectory"], [[2.5 * k, 0.5 * k] for k in range(1, 7)], atol=1e-4)
    assert np.allclose(p["history"], [[-5.0, -1.0], [-2.5, -0.5]], atol=1e-4)
    assert p["rate_hz"] == 2.0 and p["speed"] == pytest.approx(math.hypot(2.5, 0.5) / 0.5, abs=1e-3)
    assert p["command"] == "left"  # the last waypoint is 3 m to the left
    assert out["q_s5"] is None  # frames 6..9 end the scene, and 8 -> 9 is 0.8 s apart
    assert out["q_s3"] is None  # its horizon reaches the 0.8 s gap
    assert out["q_unknown"] is None
    outcomes = report.extra["trajectories"]
    assert outcomes == {"ok": 1, "scene ends before the horizon": 1, "irregular key-frame timing": 1,
                        "unknown sample token": 1}


def test_nuscenes_tables_with_a_broken_entry_name_file_and_entry(tmp_path):
    from data_recipes.common import BadInputError
    from data_recipes.nuscenes_ego import EgoPoses

    _nuscenes_tables(tmp_path / "t")
    rows = json.loads((tmp_path / "t" / "ego_pose.json").read_text())
    del rows[3]["translation"]
    (tmp_path / "t" / "ego_pose.json").write_text(json.dumps(rows))
    with pytest.raises(BadInputError, match=r"ego_pose.json: entry 3: lacks the fields \['translation'\]"):
        EgoPoses(tmp_path / "t")


# ---- the head learns ---------------------------------------------------------------------------------------------
def test_planner_head_learns_a_context_to_trajectory_mapping():
    """Three contexts, three trajectories (cruise, detour left, brake): after training, 10 Euler steps from noise
    land near the right trajectory, far closer than the mean trajectory, and the router picks each class's expert."""
    torch.manual_seed(0)
    spec = PlannerSpec(context_size=16, horizon=6, history=2, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=2, routing="trajectory", moe_layers=1, num_experts=3, top_k=1)
    head = PlannerHead(spec)
    flow = FlowMatching()
    t = torch.linspace(0.5, 3.0, 6)
    targets = torch.stack([torch.stack([8 * t, 0 * t], -1), torch.stack([8 * t, 3.5 * torch.sigmoid(3 * (t - 1))], -1),
                           torch.stack([4 * t - 0.5 * t**2, 0 * t], -1)])
    head.set_statistics(targets.reshape(-1, 2).min(0).values, targets.reshape(-1, 2).max(0).values,
                        torch.zeros(12), torch.ones(12))
    contexts = torch.randn(3, 4, 16)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(250):
        cls = torch.randint(0, 3, (32,))
        losses = head.losses(contexts[cls] + 0.05 * torch.randn(32, 4, 16), torch.ones(32, 4, dtype=torch.bool),
                             torch.zeros(32, 12), targets[cls], torch.ones(32), flow, scenario=cls)
        optimizer.zero_grad()
        (losses["flow"] + losses["router"]).backward()
        optimizer.step()
    cls = torch.arange(3).repeat(8)
    torch.manual_seed(1)
    sampled = head.sample(contexts[cls], torch.ones(24, 4, dtype=torch.bool), torch.zeros(24, 12), flow)
    pred = sampled.trajectory
    ade = (pred - targets[cls]).norm(dim=-1).mean()
    baseline = (targets.mean(0, keepdim=True) - targets[cls]).norm(dim=-1).mean()
    assert ade < 0.25 * baseline, (float(ade), float(baseline))
    assert torch.equal(sampled.route.trajectory_experts()[:, 0], cls)
