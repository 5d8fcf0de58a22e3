"""Sample format, shard I/O and the three converters, on fixtures written in the official formats in tmp_path."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_recipes import coda_lm, drivelm, synthetic
from data_recipes.common import BadInputError
from mose_lightning.data import (
    MANIFEST_NAME,
    ReadStats,
    Sample,
    SampleError,
    ShardError,
    ShardWriter,
    decode_images,
    encode_jpeg,
    expand_shards,
    iter_records,
    iter_samples,
    read_manifest,
    validate,
)
from mose_lightning.skills import load_taxonomy

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DRIVELM_SAMPLE = SHARED / "data" / "drivelm_sample" / "QA_dataset_nus" / "train_sample.json"


def _jpeg(w=64, h=36, color=(90, 120, 150)) -> bytes:
    return encode_jpeg(Image.new("RGB", (w, h), color))


def _sample(key="k_0", task="general", **kw) -> Sample:
    base = dict(key=key, dataset="coda_lm", task=task, question="What?", answer="This.", views=["front"],
                images=[_jpeg()], source={"file": "x.json"})
    base.update(kw)
    return Sample(**base)


def _tar_names(path: Path):
    with tarfile.open(path) as tar:
        return tar.getnames()


# --- sample format ------------------------------------------------------------------------------------------------


def test_sample_round_trip_and_decode():
    s = _sample(task="regional", region=[1.0, 2.0, 10.0, 5.0], category="vehicle", skills={"perception": "region_object"},
                extra={"note": 1})
    record = s.to_record()
    assert sorted(record) == ["0.jpg", "__key__", "json"]
    back = Sample.from_record(record)
    assert back == s
    (img,) = decode_images(back)
    assert img.size == (64, 36) and img.mode == "RGB"
    assert decode_images(record)[0].size == (64, 36)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"region": [0, 0, -1, 3]}, "region"),
        ({"views": ["a", "b"]}, "images"),
        ({"task": "perception"}, "task"),
        ({"answer": "  "}, "answer"),
        ({"category": "animal"}, "category"),
        ({"key": "bad.key"}, "__key__"),
    ],
)
def test_validate_names_key_and_field(change, field):
    s = _sample(**{"key": "the_key", **change})
    with pytest.raises(SampleError) as err:
        validate(s, "unit")
    assert field in str(err.value)
    if field != "__key__":
        assert "the_key" in str(err.value)


def test_from_record_rejects_bad_json_naming_key():
    record = _sample(key="abc").to_record()
    record["json"] = b"{not json"
    with pytest.raises(SampleError, match="abc.*json"):
        Sample.from_record(record)


# --- shards -------------------------------------------------------------------------------------------------------


def test_shard_writer_manifest_and_expand(tmp_path):
    out = tmp_path / "shards"
    with ShardWriter(out, prefix="part", maxcount=2) as w:
        for i in range(5):
            w.write(_sample(key=f"s_{i}", task="general" if i % 2 else "suggestion"))
    manifest = read_manifest(out)
    assert [s["name"] for s in manifest["shards"]] == [f"part-00000{i}.tar" for i in range(3)]
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["tasks"] == {"general": 2, "suggestion": 3} and manifest["num_samples"] == 5
    assert not list(out.glob("*.tmp"))
    by_dir = expand_shards(str(out))
    assert by_dir == [str(out / f"part-00000{i}.tar") for i in range(3)]
    assert expand_shards(str(out / "part-{000000..000002}.tar")) == by_dir
    assert expand_shards(f"{by_dir[0]}, {by_dir[2]}") == [by_dir[0], by_dir[2]]
    url = "https://example.org/d/train-{000..001}.tar"
    assert expand_shards(url) == ["https://example.org/d/train-000.tar", "https://example.org/d/train-001.tar"]
    assert [s.key for s in iter_samples(str(out))] == [f"s_{i}" for i in range(5)]
    with pytest.raises(ShardError, match="does not exist"):
        expand_shards(str(out / "part-000009.tar"))
    with pytest.raises(SampleError, match="duplicate"):
        with ShardWriter(tmp_path / "dup") as w:
            w.write(_sample(key="same"))
            w.write(_sample(key="same"))


def test_incomplete_dir_and_error_leave_no_manifest(tmp_path):
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, maxcount=2) as w:
            for i in range(3):
                w.write(_sample(key=f"s_{i}"))
            raise RuntimeError("converter died")
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("*.tmp"))
    with pytest.raises(ShardError, match="incomplete"):
        expand_shards(str(out))


def test_reader_damaged_tar_and_bad_member(tmp_path):
    out = tmp_path / "s"
    with ShardWriter(out, maxcount=100) as w:
        for i in range(4):
            w.write(_sample(key=f"s_{i}", images=[_jpeg(color=(i * 40, 0, 0))]))
    shard = out / "shard-000000.tar"
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="cut.tar.*damaged"):
        list(iter_records([str(cut)]))
    stats = ReadStats()
    got = list(iter_records([str(cut)], on_error="skip", stats=stats))
    assert 0 < len(got) < 4 and len(stats.skipped) == 1
    # A member that is present but not valid JSON: the sample is named and (skip) counted.
    bad = tmp_path / "bad.tar"
    with tarfile.open(shard) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if m.name == "s_1.json":
                payload = b"{broken"
                m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    with pytest.raises(SampleError, match="s_1"):
        list(iter_samples(str(bad)))
    stats = ReadStats()
    assert [s.key for s in iter_samples(str(bad), on_error="skip", stats=stats)] == ["s_0", "s_2", "s_3"]
    assert len(stats.skipped) == 1 and "s_1" in stats.skipped[0]


def _four_sample_shard(out: Path) -> Path:
    with ShardWriter(out, maxcount=100) as w:
        for i in range(4):
            w.write(_sample(key=f"s_{i}", images=[_jpeg(color=(i * 40, 0, 0))]))
    return out / "shard-000000.tar"


def _cut_after_samples(shard: Path, keep: int) -> None:
    """Cut the tar where the member after the first `keep` samples starts: a 512-byte record boundary, what a copy
    that stopped early leaves behind."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    end = members[2 * keep].offset  # two members (0.jpg, json) per sample
    assert end % 512 == 0
    data = shard.read_bytes()[:end]
    shard.chmod(0o644)
    shard.write_bytes(data)


def test_manifest_records_count_and_sha256(tmp_path):
    import hashlib

    shard = _four_sample_shard(tmp_path / "s")
    (entry,) = read_manifest(tmp_path / "s")["shards"]
    assert entry["count"] == 4 and entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


def test_shard_cut_at_a_record_boundary_is_a_damaged_shard(tmp_path):
    shard = _four_sample_shard(tmp_path / "s")
    _cut_after_samples(shard, 2)
    # The premise: tar itself reads the cut file as a valid archive of two samples.
    with tarfile.open(shard) as tar:
        assert sorted(tar.getnames()) == ["s_0.0.jpg", "s_0.json", "s_1.0.jpg", "s_1.json"]
    with pytest.raises(ShardError, match=r"shard-000000\.tar: damaged: 2 samples, the manifest lists 4"):
        list(iter_samples(str(tmp_path / "s")))
    stats = ReadStats()
    assert [s.key for s in iter_samples(str(tmp_path / "s"), on_error="skip", stats=stats)] == ["s_0", "s_1"]
    assert [(p["reason"], p["shard"], p["samples"]) for p in stats.problems] == [("damaged shard", str(shard), 2)]


def test_changed_shard_fails_the_checksum_when_asked(tmp_path):
    shard = _four_sample_shard(tmp_path / "s")
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        image = tar.getmember("s_2.0.jpg")
    data[image.offset_data + image.size // 2] ^= 0xFF  # same size, same sample count: only the checksum tells
    shard.chmod(0o644)
    shard.write_bytes(bytes(data))
    assert [s.key for s in iter_samples(str(tmp_path / "s"))] == ["s_0", "s_1", "s_2", "s_3"]
    with pytest.raises(ShardError, match=r"shard-000000\.tar: damaged: sha256"):
        list(iter_samples(str(tmp_path / "s"), verify_checksum=True))
    stats = ReadStats()
    assert list(iter_samples(str(tmp_path / "s"), on_error="skip", stats=stats, verify_checksum=True)) == []
    assert [(p["reason"], p["samples"]) for p in stats.problems] == [("damaged shard", 4)]


# --- CODA-LM -----------------------------------------------------------------------------------------------------


def _coda_ann(regions, general="Two cars ahead matter.", suggestion="Slow down."):
    return {
        "general_perception": {
            "vehicles": [{"description": "a car", "explanation": "ahead"}], "vulnerable_road_users": [],
            "traffic signs": [], "traffic lights": [], "traffic cones": [], "barriers": [], "other objects": [],
            "description and explanation": general,
        },
        "region_perception": {str(i + 1): r for i, r in enumerate(regions)},
        "driving_suggestion": suggestion,
    }


def _region(box, name="car", text="A car in front."):
    return {"description and explanation": text, "box": box, "category_name": name}


def make_coda_root(root: Path, split="Train", prefix="val", anns=None):
    anns = anns or {
        "0001": _coda_ann([_region([10, 10, 20, 10]), _region([50, 5, 10, 20], "traffic_cone", "A cone.")]),
        "0002": _coda_ann([_region([0, 0, 30, 30], "hovercraft", "Something odd.")]),
        "0003": _coda_ann([]),
    }
    (root / prefix / "images").mkdir(parents=True, exist_ok=True)
    ann_dir = root / "CODA-LM" / split
    ann_dir.mkdir(parents=True, exist_ok=True)
    for image_id, ann in anns.items():
        Image.new("RGB", (96, 54), (100, 110, 120)).save(root / prefix / "images" / f"{image_id}.jpg")
        (ann_dir / f"{prefix}_{image_id}.json").write_text(json.dumps(ann))
    return root


def test_coda_lm_round_trip(tmp_path):
    root = make_coda_root(tmp_path / "coda")
    report = coda_lm.main(["--root", str(root), "--split", "Train", "--out", str(tmp_path / "out")])
    assert report.tasks == {"general": 3, "regional": 3, "suggestion": 3}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["unknown_categories"] == {"hovercraft": 1}
    assert manifest["categories"] == {"miscellaneous": 1, "traffic_cone": 1, "vehicle": 1}
    samples = {s.key: s for s in iter_samples(str(tmp_path / "out"))}
    reg = samples["coda_lm_Train_val_0001_region_1"]
    assert reg.region == [10.0, 10.0, 20.0, 10.0] and reg.category == "vehicle" and reg.answer == "A car in front."
    assert reg.source["category_name"] == "car" and reg.source["file"].endswith("val_0001.json")
    (img,) = decode_images(reg)
    r, g, b = img.getpixel((20, 10))  # top edge of the box: red
    assert r > 200 and g < 80 and b < 80
    general = samples["coda_lm_Train_val_0001_general"]
    assert general.answer == "Two cars ahead matter." and general.region is None and general.category is None
    assert decode_images(general)[0].getpixel((20, 10))[0] < 150  # no box on the general image
    assert samples["coda_lm_Train_val_0003_suggestion"].answer == "Slow down."


def test_coda_lm_no_box_and_test_split(tmp_path):
    anns = {"0007": {"region_perception": {"1": {"box": [1, 1, 5, 5], "category_name": "bus"}}}}
    root = make_coda_root(tmp_path / "coda", split="Test", prefix="test", anns=anns)
    report = coda_lm.convert_coda_lm(root, "Test", tmp_path / "out", box_encoding="none", resize=(48, 27))
    assert report.tasks == {"general": 1, "regional": 1, "suggestion": 1}
    samples = list(iter_samples(str(tmp_path / "out")))
    assert all(s.answer is None for s in samples)
    reg = next(s for s in samples if s.task == "regional")
    assert "<region>" in reg.question and reg.region == [1.0, 1.0, 5.0, 5.0]
    assert decode_images(reg)[0].size == (48, 27)


def test_coda_lm_bad_inputs(tmp_path):
    anns = {
        "0001": _coda_ann([_region([90, 40, 20, 20])]),  # box past the 96x54 image
        "0002": _coda_ann([_region([1, 1, 5, 5])], general=""),  # empty general answer
        "0003": _coda_ann([_region([1, 1, 5, 5])]),
    }
    root = make_coda_root(tmp_path / "coda", anns=anns)
    (root / "val" / "images" / "0003.jpg").unlink()
    with pytest.raises(BadInputError, match=r"val_0001\.json: entry region_perception\.1: box .* outside"):
        coda_lm.convert_coda_lm(root, "Train", tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    report = coda_lm.convert_coda_lm(root, "Train", tmp_path / "out", skip_bad=True)
    reasons = {(Path(e["file"]).name, e["entry"]): e for e in report.skipped}
    assert set(reasons) == {("val_0001.json", "region_perception.1"), ("val_0002.json", "general_perception"),
                            ("val_0003.json", "<image>")}
    assert reasons[("val_0003.json", "<image>")]["samples"] == 3
    assert report.tasks == {"general": 1, "regional": 1, "suggestion": 2}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_skipped_entries"] == 3 and len(manifest["skipped"]) == 3
    with pytest.raises(ShardError, match="overwrite"):
        coda_lm.convert_coda_lm(root, "Train", tmp_path / "out", skip_bad=True)


def test_converter_crash_leaves_no_manifest_and_rerun_cleans(tmp_path, monkeypatch):
    root = make_coda_root(tmp_path / "coda")
    out = tmp_path / "out"
    real_write = ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_write(self, sample)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        coda_lm.convert_coda_lm(root, "Train", out, maxcount=2)
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("*.tmp"))
    assert list(out.glob("*.tar"))  # the finished shard stays: the directory is incomplete, not empty
    monkeypatch.setattr(ShardWriter, "write", real_write)
    (out / "stale-000009.tar").write_bytes(b"junk")
    report = coda_lm.convert_coda_lm(root, "Train", out, maxcount=2)
    assert report.num_samples == 9
    assert not (out / "stale-000009.tar").exists()
    assert sum(1 for _ in iter_samples(str(out))) == 9


def test_category_table():
    assert coda_lm.category_super_class("Traffic Cone") == ("traffic_cone", True)
    assert coda_lm.category_super_class("pedestrian") == ("vru", True)
    assert coda_lm.category_super_class("dog")[0] == "vru"
    assert coda_lm.category_super_class("ufo") == ("miscellaneous", False)


# --- DriveLM -----------------------------------------------------------------------------------------------------


def make_drivelm(tmp: Path, n_frames=3, missing=None):
    qa_dir = tmp / "QA_dataset_nus"
    qa_dir.mkdir(parents=True)
    frames = {}
    for f in range(n_frames):
        paths = {}
        for c, cam in enumerate(drivelm.CAMERAS):
            rel = f"../nuscenes/samples/{cam}/f{f}__{cam}.jpg"
            target = (qa_dir / rel).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            if (f, cam) != missing:
                Image.new("RGB", (32, 18), (c * 40, f * 60, 100)).save(target)
            paths[cam] = rel
        frames[f"frame{f}"] = {
            "key_object_infos": {"<c1,CAM_FRONT,10.0,9.0>": {"Category": "Vehicle", "Status": "Moving",
                                                              "Visual_description": "Red car.", "2d_bbox": [5, 5, 15, 12]}},
            "QA": {
                "perception": [{"Q": "What is <c1,CAM_FRONT,10.0,9.0>?", "A": "A car.", "C": None, "con_up": None,
                                "con_down": None, "cluster": None, "layer": None},
                               {"Q": "Any pedestrians?", "A": "No."}],
                "prediction": [{"Q": "Will <c1,CAM_FRONT,10.0,9.0> move?", "A": "Yes."}],
                "planning": [{"Q": "What should the ego car do?", "A": "Keep going."}],
                "behavior": [{"Q": "Predict the behavior of the ego vehicle.", "A": "Going straight."}],
            },
            "image_paths": paths,
        }
    data = {"scene0": {"scene_description": "A road.", "key_frames": frames}}
    path = qa_dir / "mini.json"
    path.write_text(json.dumps(data))
    return path


def test_drivelm_views_and_metadata(tmp_path):
    js = make_drivelm(tmp_path)
    report = drivelm.main(["--json", str(js), "--out", str(tmp_path / "all")])
    assert report.tasks == {"behavior": 3, "perception": 6, "planning": 3, "prediction": 3}
    samples = {s.key: s for s in iter_samples(str(tmp_path / "all"))}
    s = samples["drivelm_frame1_perception_000"]
    assert s.views == list(drivelm.CAMERAS) and len(decode_images(s)) == 6
    assert s.source["tags"][0] == {"tag": "<c1,CAM_FRONT,10.0,9.0>", "id": "c1", "camera": "CAM_FRONT", "x": 10.0, "y": 9.0}
    assert "<c1,CAM_FRONT,10.0,9.0>" in s.source["key_object_infos"] and s.source["scene_token"] == "scene0"
    assert s.region is None and s.skills is None
    drivelm.convert_drivelm(js, tmp_path / "paired", views="paired")
    p = next(iter_samples(str(tmp_path / "paired")))
    imgs = decode_images(p)
    assert p.views == ["CAM_FRONT_LEFT+CAM_FRONT", "CAM_FRONT_RIGHT+CAM_BACK_RIGHT", "CAM_BACK+CAM_BACK_LEFT"]
    assert [im.size for im in imgs] == [(64, 18)] * 3
    drivelm.convert_drivelm(js, tmp_path / "front", views="front", resize=(16, 9))
    f = next(iter_samples(str(tmp_path / "front")))
    assert f.views == ["CAM_FRONT"] and decode_images(f)[0].size == (16, 9)


def test_drivelm_missing_image(tmp_path):
    js = make_drivelm(tmp_path, missing=(1, "CAM_BACK"))
    with pytest.raises(BadInputError, match=r"mini\.json: entry scene scene0 / frame frame1: image_paths\.CAM_BACK"):
        drivelm.convert_drivelm(js, tmp_path / "out")
    report = drivelm.convert_drivelm(js, tmp_path / "out", skip_bad=True)
    assert report.num_samples == 10 and report.skipped[0]["samples"] == 5
    # Only the front camera is needed: the missing back image does not matter.
    assert drivelm.convert_drivelm(js, tmp_path / "front", views="front").num_samples == 15


def test_drivelm_holdout_function():
    frames = [f"f{i:02d}" for i in range(30)]
    test = drivelm.holdout_frames(frames, 6, seed=3)
    assert len(test) == 5 and test == drivelm.holdout_frames(list(reversed(frames)), 6, seed=3)
    assert test != drivelm.holdout_frames(frames, 6, seed=4)


@pytest.mark.skipif(not DRIVELM_SAMPLE.is_file(), reason="real DriveLM sample (../shared) not present")
def test_drivelm_real_sample(tmp_path):
    data = json.loads(DRIVELM_SAMPLE.read_text())
    expected = {}
    for scene in data.values():
        for token, frame in scene["key_frames"].items():
            for group, items in frame["QA"].items():
                for i, _ in enumerate(items):
                    expected[f"drivelm_{token}_{group}_{i:03d}"] = token
    assert len(expected) == 790
    report = drivelm.convert_drivelm(DRIVELM_SAMPLE, tmp_path / "out", holdout=6, seed=0, resize=(48, 27))
    assert report.num_samples == 790 and not report.skipped
    frames_by_split = {}
    for split in ("train", "test"):
        keys = []
        for s in iter_samples(str(tmp_path / "out" / split)):
            assert len(decode_images(s)) == 6 and s.answer
            keys.append(s.key)
        frames_by_split[split] = {expected[k] for k in keys}
        assert set(read_manifest(tmp_path / "out" / split)["frames"]) == frames_by_split[split]
        frames_by_split[split + "_keys"] = keys
    keys = frames_by_split["train_keys"] + frames_by_split["test_keys"]
    assert sorted(keys) == sorted(expected)  # each QA exactly once
    assert not frames_by_split["train"] & frames_by_split["test"]
    all_frames = sorted(set(expected.values()))
    assert sorted(frames_by_split["test"]) == drivelm.holdout_frames(all_frames, 6, 0)


# --- synthetic ---------------------------------------------------------------------------------------------------


def test_synthetic_deterministic(tmp_path):
    a = synthetic.generate_synthetic(tmp_path / "a", 24, 6, 6, seed=7)
    synthetic.generate_synthetic(tmp_path / "b", 24, 6, 6, seed=7)
    synthetic.main(["--out", str(tmp_path / "c"), "--num", "24", "--num-val", "6", "--num-test", "6", "--seed", "8"])
    assert a.counts["train"] == {"general": 8, "regional": 8, "suggestion": 8}
    for split in ("train", "val", "test"):
        for name in ("manifest.json", f"{split}-000000.tar"):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    assert (tmp_path / "a/train/train-000000.tar").read_bytes() != (tmp_path / "c/train/train-000000.tar").read_bytes()
    with pytest.raises(ShardError, match="split directories"):
        expand_shards(str(tmp_path / "a"))
    # Splits draw different scenes.
    val = [s.answer for s in iter_samples(str(tmp_path / "a" / "val"))]
    assert val != [s.answer for s in iter_samples(str(tmp_path / "a" / "train"))][:6]


def test_synthetic_answers_depend_on_image_and_skills_covered():
    taxonomy = load_taxonomy(ROOT / "configs" / "skills" / "driving.yaml")
    levels = {lv.name: lv.skill_names for lv in taxonomy.levels}
    answers = {"general": set(), "regional": set(), "suggestion": set()}
    questions = {"general": set(), "regional": set(), "suggestion": set()}
    seen = {lv: set() for lv in levels}
    for i in range(240):
        s = synthetic.make_sample("train", i, seed=0)
        validate(s, "synthetic", skill_levels=levels)
        answers[s.task].add(s.answer)
        questions[s.task].add(s.question)
        for lv, skill in s.skills.items():
            seen[lv].add(skill)
        assert 5 <= len(s.answer.split()) <= 40
        if s.task == "regional":
            x, y, w, h = s.region
            assert x >= 0 and y >= 0 and x + w <= 224 and y + h <= 126 and s.category is not None
        else:
            assert s.region is None
    for task in answers:
        assert len(questions[task]) == 1  # one fixed question per task ...
        assert len(answers[task]) >= 10  # ... whose answer changes with the scene
    assert seen == {lv: set(names) for lv, names in levels.items()}


# --- bad input that used to pass or crash ------------------------------------------------------------------------


def test_coda_lm_region_keys_that_collide_name_both_entries(tmp_path):
    ann = _coda_ann([_region([10, 10, 20, 10])])
    ann["region_perception"]["1 "] = _region([50, 5, 10, 20], "traffic_cone", "A cone.")
    root = make_coda_root(tmp_path / "coda", anns={"0001": ann})
    with pytest.raises(BadInputError) as err:
        coda_lm.convert_coda_lm(root, "Train", tmp_path / "out")
    message = str(err.value)
    assert "val_0001.json: entry region_perception['1 ']" in message
    assert "already taken by" in message and "entry region_perception.1 " in message + " "
    report = coda_lm.convert_coda_lm(root, "Train", tmp_path / "out", skip_bad=True)
    assert report.tasks == {"general": 1, "regional": 1, "suggestion": 1}
    (skipped,) = read_manifest(tmp_path / "out")["skipped"]
    assert skipped["entry"] == "region_perception['1 ']" and "region_perception.1" in skipped["reason"]
    (regional,) = [s for s in iter_samples(str(tmp_path / "out")) if s.task == "regional"]
    assert regional.answer == "A car in front."  # the first entry keeps the key


def test_coda_lm_files_whose_keys_collide_name_both_files(tmp_path):
    root = make_coda_root(tmp_path / "coda", anns={"a.b": _coda_ann([]), "a_b": _coda_ann([], general="Other.")})
    with pytest.raises(BadInputError, match=r"val_a_b\.json: entry general_perception: .* taken by \S*val_a\.b\.json"):
        coda_lm.convert_coda_lm(root, "Train", tmp_path / "out")
    report = coda_lm.convert_coda_lm(root, "Train", tmp_path / "out", skip_bad=True)
    assert report.num_samples == 2 and {Path(e["file"]).name for e in report.skipped} == {"val_a_b.json"}
    assert len(report.skipped) == 2


def test_duplicate_json_keys_are_bad_input_naming_the_key(tmp_path):
    root = make_coda_root(tmp_path / "coda", anns={"0001": _coda_ann([]), "0002": _coda_ann([])})
    path = root / "CODA-LM" / "Train" / "val_0001.json"
    text = path.read_text()
    path.write_text(text[:-1] + ', "driving_suggestion": "Speed up."}')
    with pytest.raises(BadInputError, match=r"val_0001\.json: entry <file>: duplicate JSON key 'driving_suggestion'"):
        coda_lm.convert_coda_lm(root, "Train", tmp_path / "out")
    report = coda_lm.convert_coda_lm(root, "Train", tmp_path / "out", skip_bad=True)
    assert report.num_samples == 2 and report.skipped[0]["entry"] == "<file>"

    js = make_drivelm(tmp_path / "dl", n_frames=2)
    raw = js.read_text()
    # The second key frame under the first one's token: json.load would keep only the second.
    js.write_text(raw.replace('"frame1"', '"frame0"'))
    with pytest.raises(BadInputError, match=r"mini\.json: duplicate JSON key 'frame0'"):
        drivelm.convert_drivelm(js, tmp_path / "dl_out", skip_bad=True)


def test_drivelm_frame_token_in_two_scenes_names_both(tmp_path):
    js = make_drivelm(tmp_path, n_frames=2)
    data = json.loads(js.read_text())
    data["scene1"] = {"scene_description": "Again.", "key_frames": {"frame1": data["scene0"]["key_frames"]["frame1"]}}
    js.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"scene scene1 / frame frame1: the frame token is also a key frame of scene scene0"):
        drivelm.convert_drivelm(js, tmp_path / "out")
    report = drivelm.convert_drivelm(js, tmp_path / "out", skip_bad=True)
    assert report.num_samples == 10 and report.skipped[0]["samples"] == 5


def test_drivelm_image_paths_outside_the_dataset_root_are_refused(tmp_path):
    js = make_drivelm(tmp_path / "DriveLM", n_frames=3)
    outside = tmp_path / "elsewhere" / "front.jpg"
    outside.parent.mkdir()
    Image.new("RGB", (32, 18), (1, 2, 3)).save(outside)
    data = json.loads(js.read_text())
    frames = data["scene0"]["key_frames"]
    frames["frame0"]["image_paths"]["CAM_FRONT"] = str(outside)
    frames["frame1"]["image_paths"]["CAM_BACK"] = "../../etc/passwd"
    js.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"frame frame0: image_paths\.CAM_FRONT: .*front\.jpg' lies outside the dataset root"):
        drivelm.convert_drivelm(js, tmp_path / "out")
    report = drivelm.convert_drivelm(js, tmp_path / "out", skip_bad=True)
    assert report.num_samples == 5
    assert {e["entry"] for e in report.skipped} == {"scene scene0 / frame frame0", "scene scene0 / frame frame1"}
    assert any("'../../etc/passwd' lies outside" in e["reason"] for e in report.skipped)
    # Allowed: the absolute path is read; ../../etc/passwd (from the JSON's folder: tmp_path/etc/passwd) is missing.
    report = drivelm.convert_drivelm(js, tmp_path / "allowed", allow_outside_root=True, skip_bad=True)
    assert report.num_samples == 10 and [e["entry"] for e in report.skipped] == ["scene scene0 / frame frame1"]
    assert "image not found" in report.skipped[0]["reason"]
    # A dataset whose nuscenes/ folder is a link to another disk stays inside its root.
    good = make_drivelm(tmp_path / "DriveLM2", n_frames=1)
    (tmp_path / "disk").mkdir()
    (tmp_path / "DriveLM2" / "nuscenes").rename(tmp_path / "disk" / "nuscenes")
    (tmp_path / "DriveLM2" / "nuscenes").symlink_to(tmp_path / "disk" / "nuscenes")
    assert drivelm.convert_drivelm(good, tmp_path / "linked").num_samples == 5


def test_drivelm_file_without_qa_is_an_error_unless_allowed(tmp_path):
    js = make_drivelm(tmp_path, n_frames=1)
    data = json.loads(js.read_text())
    data["scene0"]["key_frames"]["frame0"]["QA"] = {}
    js.write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=r"mini\.json: no QA sample to write"):
        drivelm.convert_drivelm(js, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert drivelm.convert_drivelm(js, tmp_path / "out", allow_empty=True).num_samples == 0
    assert read_manifest(tmp_path / "out")["num_samples"] == 0


def test_data_commands_print_bad_input_as_one_error_line(tmp_path, capsys):
    from mose_lightning import cli

    anns = {"0001": _coda_ann([_region([90, 40, 20, 20])])}
    root = make_coda_root(tmp_path / "coda", anns=anns)
    args = ["data", "coda-lm", "--root", str(root), "--split", "Train", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "val_0001.json: entry region_perception.1" in err
    with pytest.raises(BadInputError):  # --debug: the exception itself, with its traceback
        cli.main(args + ["--debug"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "drivelm", "--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: drivelm: ") and "missing.json not found" in err
