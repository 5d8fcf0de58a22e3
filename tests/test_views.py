"""Camera-view routing: view labels (DriveLM derivation, synthetic by construction), the focal loss, Gumbel
straight-through selection, what reaches the vision tower, teacher forcing, skill routing over the chosen views, a
router that learns, bad input, and training + evaluation in two DDP processes on CPU."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_recipes import drivelm, synthetic
from data_recipes.view_labels import derive_cameras, direction_cameras, label_views
from mose_lightning.config import ConfigError, load_config
from mose_lightning.data.sample import Sample, SampleError, validate
from mose_lightning.moe.losses import focal_loss, inverse_frequency_alpha
from mose_lightning.moe.view_routing import choose_views, gumbel_top_k, view_router_loss

PROJECT = Path(__file__).resolve().parent.parent
VIEW_TOY = PROJECT / "configs" / "experiment" / "toy_view_moe.yaml"
DRIVELM_JSON = PROJECT.parent / "shared" / "data" / "drivelm_sample" / "QA_dataset_nus" / "train_sample.json"
needs_drivelm = pytest.mark.skipif(not DRIVELM_JSON.is_file(), reason="the DriveLM sample in ../shared is absent")


# ---- DriveLM view labels --------------------------------------------------------------------------------------
def _qa(frame_token: str, group: str, index: int):
    data = json.loads(DRIVELM_JSON.read_text())
    for scene in data.values():
        if frame_token in scene["key_frames"]:
            item = scene["key_frames"][frame_token]["QA"][group][index]
            return item["Q"], item["A"]
    raise KeyError(frame_token)


# Entries of the real sample read by hand: (frame, group, index, the cameras the QA needs).
HAND_CHECKED = [
    # "What are objects to the front right of the ego car?" -> the front-right camera
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 0, ["CAM_FRONT_RIGHT"]),
    # "What is the status of the trucks that are to the back left of the ego car?"
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 4, ["CAM_BACK_LEFT"]),
    # "Please describe the current scene." / "... two moving cars behind the ego car and two barriers in front of
    # it": "behind the ego car" names the back camera; "in front of it" names no camera
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 22, ["CAM_BACK"]),
    # "<c2,CAM_BACK,...> is at the back of <c1,CAM_BACK,...>": the tags name the camera, "at the back of <c1>" not
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 23, ["CAM_BACK"]),
    # important objects: a brown SUV and a black sedan behind (tags CAM_BACK), a green light in front (CAM_FRONT)
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 27, ["CAM_BACK", "CAM_FRONT"]),
    # "Is there any traffic element in the front view?"
    ("4a0798f849ca477ab18009c3a20b7df2", "perception", 24, ["CAM_FRONT"]),
    # a prediction QA about a tagged object: its camera only (direction words do not count outside perception)
    ("4a0798f849ca477ab18009c3a20b7df2", "prediction", 0, ["CAM_BACK"]),
    # "What is the traffic signal that the ego vehicle should pay attention to?" -> "Green light.": none named
    ("4a0798f849ca477ab18009c3a20b7df2", "planning", 10, []),
    # object priority: the front light first, then the two cars behind
    ("4a0798f849ca477ab18009c3a20b7df2", "planning", 14, ["CAM_FRONT", "CAM_BACK"]),
]


@needs_drivelm
@pytest.mark.parametrize("frame,group,index,expected", HAND_CHECKED)
def test_drivelm_view_labels_on_hand_checked_entries(frame, group, index, expected):
    question, answer = _qa(frame, group, index)
    cameras, evidence = derive_cameras(question, answer, group)
    assert cameras == expected
    assert set(evidence) == set(expected)
    labels, _, dropped = label_views(question, answer, group, ["CAM_FRONT"])
    assert labels == [c for c in expected if c == "CAM_FRONT"] and dropped == [c for c in expected if c != "CAM_FRONT"]


def test_direction_words_count_only_relative_to_the_ego_car():
    assert direction_cameras("Objects to the rear left of the ego vehicle and on the front of the ego car.") == [
        "CAM_BACK_LEFT", "CAM_FRONT"]
    assert direction_cameras("A truck is behind the ego car; a car in front of the ego vehicle.") == ["CAM_BACK", "CAM_FRONT"]
    assert direction_cameras("<c2> is at the back of <c1>, to the left of the truck, behind the bus.") == []
    # paired views hold two cameras each
    assert label_views("What is to the back left of the ego car?", None, "perception",
                       ["CAM_FRONT_LEFT+CAM_FRONT", "CAM_BACK+CAM_BACK_LEFT"])[0] == ["CAM_BACK+CAM_BACK_LEFT"]


@needs_drivelm
def test_drivelm_converter_writes_and_counts_the_view_labels(tmp_path):
    report = drivelm.convert_drivelm(DRIVELM_JSON, tmp_path / "out", views="front")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # Independent recount from the JSON: cameras each QA needs, before the front-only view mode drops them.
    expected_front = expected_none = 0
    dropped = {}
    for scene in json.loads(DRIVELM_JSON.read_text()).values():
        for frame in scene["key_frames"].values():
            for group, items in frame["QA"].items():
                for item in items:
                    cameras, _ = derive_cameras(item["Q"], item["A"], group)
                    expected_front += "CAM_FRONT" in cameras
                    expected_none += "CAM_FRONT" not in cameras
                    for camera in cameras:
                        if camera != "CAM_FRONT":
                            dropped[camera] = dropped.get(camera, 0) + 1
    counts = manifest["view_labels"]
    assert counts["samples"] == report.num_samples == 790
    assert counts["views"] == {"CAM_FRONT": expected_front}
    assert counts["none_named"] == expected_none and counts["dropped_cameras"] == dropped
    assert "view labels" in report.summary()
    from mose_lightning.data.shards import iter_records

    record = next(iter_records(sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))))
    sample = Sample.from_record(record)
    assert sample.view_labels is not None and set(sample.view_labels) <= {"CAM_FRONT"}
    assert "view_label_evidence" in sample.source


# ---- synthetic multi-view set -----------------------------------------------------------------------------------
def test_synthetic_multiview_is_deterministic_and_labelled_by_construction(tmp_path):
    for name in ("a", "b"):
        synthetic.generate_synthetic_multiview(tmp_path / name, 12, 2, 2, seed=3, maxcount=4)
    digest = {name: [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / name / "train").glob("*.tar"))]
              for name in ("a", "b")}
    assert digest["a"] == digest["b"] and len(digest["a"]) == 3
    kinds = set()
    for i in range(40):
        s = synthetic.make_multiview_sample("train", i, 0, cameras=["CAM_FRONT", "CAM_BACK", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT"])
        validate(s)
        needed = s.view_labels[0]
        assert s.view_labels == [s.source["needed_view"]] and needed in s.views
        obj = s.source["objects"][needed]
        # The answer names what the needed camera holds (or that it is empty): only that view answers it.
        assert (obj is None and ("Nothing" in s.answer or "clear" in s.answer)) or (obj is not None and obj["kind"] in s.answer.lower())
        kinds.add(s.source["question_type"])
    assert kinds == {"look", "command", "sign"}
    with pytest.raises(ValueError, match="CAM_FRONT"):
        synthetic.generate_synthetic_multiview(tmp_path / "c", 1, 0, 0, cameras=["CAM_BACK", "CAM_BACK_LEFT"])


def test_training_label_counts_from_the_manifest_match_the_records(views_data):
    from mose_lightning.data.shards import expand_shards, iter_records
    from mose_lightning.data.view_encode import count_view_targets

    for fallback in ("NONE", "CAM_BACK"):
        views = load_config(VIEW_TOY, [f"views.fallback={fallback}"]).views
        expected = {name: 0 for name in views.classes}
        for record in iter_records(expand_shards(str(views_data / "train"))):
            sample = Sample.from_record(record)
            needed = [v for v in sample.view_labels if v in views.candidates] or [fallback]
            for name in needed:
                expected[name] += 1
        shards = expand_shards(str(views_data / "train"))
        assert count_view_targets(shards, views) == expected  # from the manifest's label-set counts
        partial = count_view_targets(shards[:2], views)  # a subset of a folder's shards: read from the records
        assert sum(partial.values()) == 8


# ---- losses and selection ---------------------------------------------------------------------------------------
def test_focal_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 2])
    alpha = torch.tensor([0.5, 0.3, 0.2])
    expected = []
    for row, t in zip(logits.tolist(), target.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected.append(-alpha[t].item() * (1 - p) ** 2 * math.log(p))
    # sample 1: p = e^2 / (e^2 + 1 + e^-1) = 0.8438, loss = 0.5 * 0.1562^2 * 0.1698 = 0.00207
    assert expected[0] == pytest.approx(0.002072, abs=2e-6)
    assert focal_loss(logits, target, 2.0, alpha, "none").tolist() == pytest.approx(expected, rel=1e-5)
    assert float(focal_loss(logits, target, 2.0, alpha)) == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert float(focal_loss(logits, target, 0.0)) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-6)
    # 1/10 : 1/30, normalised; the unseen class gets the weight of the rarest seen one (1/10)
    assert inverse_frequency_alpha([10, 30, 0]).tolist() == pytest.approx([3 / 7, 1 / 7, 3 / 7])
    assert inverse_frequency_alpha([10, 30]).tolist() == pytest.approx([0.75, 0.25])
    # multi-label targets: each labelled view is right, weighted 1/labels, so both samples weigh the same
    targets = torch.tensor([[True, False, True], [False, True, False]])
    loss = view_router_loss(logits, targets, torch.ones(2, 3, dtype=torch.bool), None, 2.0)
    per = focal_loss(logits[[0, 0, 1]], torch.tensor([0, 2, 1]), 2.0, None, "none")
    assert float(loss) == pytest.approx(float((per[0] / 2 + per[1] / 2 + per[2]) / 2), rel=1e-6)


def test_gumbel_top_k_is_one_hot_forward_and_soft_backward():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    available = torch.ones(5, 4, dtype=torch.bool)
    available[0, 1] = False
    chosen, weights = gumbel_top_k(logits, available, 2, tau=0.7, generator=torch.Generator().manual_seed(1))
    # forward: exactly one-hot per slot, two distinct available views per sample
    assert torch.equal(weights.detach(), torch.nn.functional.one_hot(chosen, 4).float())
    assert bool((chosen[:, 0] != chosen[:, 1]).all()) and 1 not in chosen[0].tolist()
    # backward: the gradient of the soft weights (softmax of the same perturbed logits, earlier draws masked)
    values = torch.randn(5, 2, 4)
    (weights * values).sum().backward()
    uniform = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    ref = logits.detach().clone().requires_grad_(True)
    scores = ((ref + gumbel) / 0.7).masked_fill(~available, torch.finfo(torch.float32).min)
    first = scores.softmax(-1)
    second = scores.scatter(1, chosen[:, :1], torch.finfo(torch.float32).min).softmax(-1)
    ((first * values[:, 0]).sum() + (second * values[:, 1]).sum()).backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6) and logits.grad.abs().sum() > 0


def test_choose_views_sources():
    classes = ["CAM_BACK", "CAM_FRONT_LEFT", "NONE"]
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 5.0], [0.0, 2.0, 1.0]])
    available = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    targets = torch.tensor([[False, True, False], [False, False, False], [False, False, True]])
    router = choose_views(logits, available, 1, "router", classes)
    assert router.chosen.tolist() == [[0], [2], [1]] and router.shown() == [[0], [], [1]]
    labels = choose_views(logits, available, 1, "labels", classes, targets)
    assert labels.shown() == [[1], [], []]  # sample 2 has no label: the router decides (NONE); sample 3: NONE
    everything = choose_views(logits, available, 1, "all", classes)
    assert everything.shown() == [[0, 1], [0, 1], [1]]  # views a sample lacks are never shown
    assert choose_views(logits, available, 1, "kept", classes).shown() == [[], [], []]
    extra = choose_views(logits, available, 1, "labels", classes, targets, extra_prob=1.0)
    assert extra.shown() == [[0, 1], [], [1]]
    assert choose_views(logits, available, 2, "router", classes).shown() == [[0, 1], [1], [1]]


# ---- the model: what reaches the vision tower, teacher forcing, MoSE over the chosen views ---------------------
@pytest.fixture(scope="module")
def views_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("views_data")
    synthetic.generate_synthetic_multiview(out, 32, 8, 8, seed=0, maxcount=4)
    return out


def view_config(toy_dir, data, *overrides):
    return load_config(VIEW_TOY, [f"backbone.toy_dir={toy_dir}", "backbone.init_checkpoint=null",
                                  f"data.train_shards={data / 'train'}",
                                  f"data.val_shards={data / 'val'}", f"data.test_shards={data / 'test'}",
                                  "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0", *overrides])


def encoded_batch(model, samples, with_answer=True):
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.data.view_encode import collate_views

    dm = DriveDataModule(model.cfg.data, model.adapter, model.processor, model.taxonomy, model.cfg.views)
    encoder = dm.encoder(with_answer)
    return collate_views([encoder(s) for s in samples])


def coloured_samples(n=3):
    """Multi-view samples whose views are solid colours, one colour per camera (identifiable in the pixels)."""
    from PIL import Image

    from mose_lightning.data.sample import encode_jpeg

    out = []
    for i in range(n):
        base = synthetic.make_multiview_sample("test", i, 0)
        base.images = [encode_jpeg(Image.new("RGB", (224, 126), (40 * k, 250 - 40 * k, 90)), 95)
                       for k in range(len(base.views))]
        out.append(base)
    return out


class VisionSpy:
    """Counts the images the vision tower encodes and records their mean pixel values (to tell views apart)."""

    def __init__(self, model):
        self.grids, self.means = [], []
        visual = model.backbone.model.visual
        self.handle = visual.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        pixels, grid = args[0], kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        start = 0
        for row in grid.tolist():
            n = row[0] * row[1] * row[2]
            self.means.append(round(float(pixels[start:start + n].mean()), 3))
            start += n
        self.grids.append(grid.shape[0])


def test_only_the_chosen_views_reach_the_vision_tower(toy_dir, views_data):
    from mose_lightning.model import build_model

    model = build_model(view_config(toy_dir, views_data)).eval()
    samples = coloured_samples(3)
    batch = encoded_batch(model, samples, with_answer=False)
    # Each view's pixels, preprocessed alone: what the tower would receive for that camera.
    reference = {}
    for item in batch["view_items"][:1]:
        spy = VisionSpy(model)
        model.adapter.image_tokens_per_image(model.backbone, item["pixel_values"], item["grid_thw"])
        spy.handle.remove()
        reference = dict(zip(spy.means, [model.views.names[v] for v in item["view_index"].tolist()]))
    classes = model.views.classes
    with torch.no_grad():  # make the router pick CAM_BACK_LEFT for every sample
        model.views.router.head[-1].bias.copy_(torch.tensor([10.0 if c == "CAM_BACK_LEFT" else 0.0 for c in classes]))
    spy = VisionSpy(model)
    out = model.generate(batch, 2, view_source="router")
    spy.handle.remove()
    assert spy.grids == [3, 3]  # one call for the kept views, one for the chosen ones: 6 images for 3 samples
    assert [reference[m] for m in spy.means] == ["CAM_FRONT"] * 3 + ["CAM_BACK_LEFT"] * 3
    assert out.views.images_encoded == 6 and out.views.shown == [["CAM_FRONT", "CAM_BACK_LEFT"]] * 3
    assert out.views.image_tokens.tolist() == [64, 64, 64]
    # Gumbel training encodes every candidate (each slot mixes them) but still shows one.
    spy = VisionSpy(model)
    out = model(encoded_batch(model, samples), view_source="gumbel")
    spy.handle.remove()
    assert spy.grids == [3, 15] and all(len(s) == 2 for s in out.views.shown)
    assert out.views.image_tokens.tolist() == [64, 64, 64]  # two images of 32 tokens in each prompt, not six


def test_teacher_forcing_shows_the_labelled_views_and_trains_the_router(toy_dir, views_data):
    from mose_lightning.model import build_model

    model = build_model(view_config(toy_dir, views_data, "views.extra_view_prob=0")).train()
    samples = [synthetic.make_multiview_sample("train", i, 0) for i in range(6)]
    samples[1].view_labels = None  # no labels: the router decides, and the loss leaves it out
    out = model(encoded_batch(model, samples), view_source="labels")
    for i, (sample, shown) in enumerate(zip(samples, out.views.shown)):
        if sample.view_labels is not None:
            assert shown == ["CAM_FRONT"] + [v for v in sample.view_labels if v != "CAM_FRONT"]
    assert out.views.decision.source == "labels"
    assert "view_router" in out.aux_losses and out.aux_losses["view_router"] > 0
    out.training_loss.backward()
    assert model.views.router.head[-1].weight.grad.abs().sum() > 0
    # the view embedding of a shown candidate view gets the answer loss's gradient, the others none
    shown_views = {v for row in out.views.shown for v in row if v != "CAM_FRONT"}
    grads = model.views.view_embedding.weight.grad.abs().sum(dim=1)
    for name in model.views.names:
        assert (grads[model.views.view_index(name)] > 0) == (name in shown_views), name


def test_skill_routers_pool_over_the_prompt_tokens_of_the_chosen_views(toy_dir, views_data):
    from mose_lightning.model import build_model

    model = build_model(view_config(toy_dir, views_data, "moe.kind=mose", "moe.layers=all",
                                    "moe.level_allocation=[1,1,2]")).eval()
    batch = encoded_batch(model, [synthetic.make_multiview_sample("train", i, 0) for i in range(3)])
    captured = {}

    def keep_input(module, args, kwargs):
        captured["h"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = model.adapter.decoder_layers(model.backbone)[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        out = model(batch, view_source="labels")
    handle.remove()
    hidden, mask = captured["h"], out.views.prompt_mask
    expected = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(out.routes[0].pooled, expected.float(), atol=1e-5)
    # the prompt mask covers the text before the answer and the image blocks of exactly the shown views
    for b, item in enumerate(batch["view_items"]):
        blocks = len(out.views.shown[b])
        text = len(item["prefix_ids"]) + len(item["suffix_ids"])
        assert int(mask[b].sum()) == text + int(out.views.image_tokens[b]) + 2 * blocks
        assert int(out.views.image_tokens[b]) == 32 * blocks


# ---- a router that learns ------------------------------------------------------------------------------------------
def test_toy_view_router_learns_the_labelled_view(toy_dir, views_data, tmp_path):
    from mose_lightning.stages.view_pretrain import run_view_pretrain

    data = tmp_path / "mv"
    synthetic.generate_synthetic_multiview(data, 96, 24, 0, seed=1, maxcount=24)
    cfg = view_config(toy_dir, data, f"run_dir={tmp_path / 'pretrain'}", f"views.pretrain.cache_dir={tmp_path / 'cache'}",
                      "views.pretrain.epochs=30", "views.pretrain.lr=3e-3", "views.pretrain.batch_size=24",
                      "views.router_dropout=0",
                      "data.eval_batch_size=24")
    run_dir, metrics = run_view_pretrain(cfg)
    assert metrics["images_encoded"] == 120  # one kept view per sample, nothing else
    # chance: the most frequent class of 6 covers about a quarter of the samples
    assert metrics["view_router/acc"] >= 0.75 and metrics["test_labelled"] == 24
    saved = torch.load(run_dir / "view_router.pt", weights_only=True)
    assert saved["classes"] == cfg.views.classes and (run_dir / "confusion.png").is_file()
    # fine-tuning loads it
    from mose_lightning.checkpoint import model_from_config

    model = model_from_config(view_config(toy_dir, data, f"views.router_checkpoint={run_dir / 'view_router.pt'}"))
    assert torch.equal(model.views.router.head[-1].weight, saved["router"]["head.3.weight"])


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_view_input_gets_clear_errors(toy_dir, views_data):
    sample = synthetic.make_multiview_sample("train", 0, 0, cameras=["CAM_FRONT", "CAM_BACK"])
    sample.view_labels = ["CAM_BACK_LEFT"]
    with pytest.raises(SampleError, match=r"synthetic_views_train_000000.*view_labels.*CAM_BACK_LEFT"):
        validate(sample)
    with pytest.raises(ConfigError, match=r"views.top_k: expected 1 <= top_k <= 5"):
        load_config(VIEW_TOY, ["views.top_k=6"])
    with pytest.raises(ConfigError, match=r"views.fallback"):
        load_config(VIEW_TOY, ["views.fallback=CAM_FRONT"])
    with pytest.raises(ConfigError, match=r"views.kept"):
        load_config(VIEW_TOY, ["views.kept=[CAM_SIDE]"])
    from mose_lightning.model import build_model

    model = build_model(view_config(toy_dir, views_data))
    lacking = synthetic.make_multiview_sample("train", 1, 0, cameras=["CAM_FRONT", "CAM_BACK"])
    lacking.views, lacking.images, lacking.view_labels = ["CAM_BACK"], lacking.images[1:], ["CAM_BACK"]
    with pytest.raises(SampleError, match=r"lacks the kept view.*CAM_FRONT"):
        encoded_batch(model, [lacking])


# ---- DDP on two CPU processes, then evaluation -------------------------------------------------------------------
def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out: {' '.join(args)}\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def test_ddp_two_cpu_processes_train_save_and_evaluate(toy_dir, views_data, tmp_path):
    mose = str(Path(sys.executable).parent / "mose")
    common = [f"backbone.toy_dir={toy_dir}", "backbone.init_checkpoint=null", f"data.train_shards={views_data / 'train'}",
              f"data.val_shards={views_data / 'val'}", f"data.test_shards={views_data / 'test'}",
              "data.batch_size=2", "data.eval_batch_size=4", "trainer.log_every_n_steps=1",
              # the preparation lock lives beside the synthetic data: keep it in this test's folder
              f"data.synthetic.out_dir={tmp_path / 'syn' / 'single'}", f"views.synthetic.out_dir={tmp_path / 'syn' / 'views'}"]
    run_dir = tmp_path / "ddp"
    _run([mose, "sft", "--config", str(VIEW_TOY), *common, "trainer.devices=2", "trainer.strategy=ddp",
          "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=1", f"run_dir={run_dir}",
          "views.train_mode=gumbel"])
    from mose_lightning.checkpoint import load_model

    model = load_model(run_dir / "model")
    saved = torch.load(sorted((run_dir / "checkpoints").glob("last*.ckpt"))[0], weights_only=False)["state_dict"]
    assert torch.equal(saved["model.views.router.head.3.weight"], model.views.router.head[3].weight)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "val/view_router_acc" in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "views/confusion" in events.Tags()["images"] and "train/view_router_acc" in events.Tags()["scalars"]
    eval_dir = tmp_path / "eval"
    from mose_lightning import cli

    cli.main(["eval", "--config", str(VIEW_TOY), *common, f"checkpoint={run_dir}", f"run_dir={eval_dir}",
              "eval.limit=8", "eval.max_new_tokens=4"])
    records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for r in records:
        assert r["views_shown"][0] == "CAM_FRONT" and len(r["views_shown"]) <= 2
        assert {c["view"] for c in r["view_choice"]} == set(model.views.classes)
        assert r["view_predicted"] in model.views.classes and r["needs_other_view"] is not None
        assert [v["view"] for v in r["view_images"]] == r["views_shown"]
    scores = json.loads((eval_dir / "scores.json").read_text())["scores"]
    routing = scores["view_routing"]
    expected = sum(r["view_predicted"] in r["view_targets"] for r in records) / 8
    assert routing["accuracy"] == pytest.approx(expected) and routing["labelled"] == 8
    assert sum(s["n"] for s in scores["local_by_view_need"].values()) == 8
    assert "View routing" in (eval_dir / "results.md").read_text()
    assert "Views shown" in (eval_dir / "report.html").read_text() and (eval_dir / "view_confusion.png").is_file()
