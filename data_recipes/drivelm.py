"""DriveLM-nuScenes v1.1 QA JSON -> WebDataset shards in the sample format of mose_lightning/data/sample.py.

One sample per QA item; `task` = its QA group (perception | prediction | planning | behavior). Image paths in the
JSON (`../nuscenes/samples/CAM_*/...jpg`) resolve relative to the JSON file's folder and must stay inside the
dataset root (the folder above it, or `image_root`): an absolute path or one climbing out with `../..` is bad
input unless `allow_outside_root`. A frame token that appears in two scenes, two QA items whose sample keys
coincide, and a key twice in one JSON object are bad input naming both places; a file without any QA sample is an
error unless `allow_empty`.

Views (`views=`):
  all     six images in the order of the DriveLM file: CAM_FRONT, CAM_FRONT_LEFT, CAM_FRONT_RIGHT, CAM_BACK,
          CAM_BACK_LEFT, CAM_BACK_RIGHT
  paired  three side-by-side images, each two cameras that are neighbours clockwise around the car, so the seam
          joins overlapping fields of view: CAM_FRONT_LEFT|CAM_FRONT, CAM_FRONT_RIGHT|CAM_BACK_RIGHT,
          CAM_BACK|CAM_BACK_LEFT (left|right); the right half is scaled to the left half's height (aspect kept),
          so a pair is one view high and two views wide; view names are "LEFT+RIGHT"
  front   CAM_FRONT only
`resize=(W, H)` scales every camera image first (before pairing); default keeps the originals byte for byte.

Object tags in questions (`<c1,CAM_BACK,1088.3,497.5>`) stay in the text; they are also parsed into
`source.tags`, and the frame's `key_object_infos` are kept in `source` for the match metric and the annotator.
`region`, `category` and `skills` are null. `view_labels` (the views a question needs) are derived from the QA text
by data_recipes/view_labels.py; the manifest and the printed report count them.

Holdout (`holdout=K`): the key frames (never single QAs, so no frame is on both sides) are shuffled with `seed`
and round(n/K) of them go to OUT/test, the rest to OUT/train (MoSE holds out 1/6 of the training file); without
holdout everything goes to OUT. The chosen frame tokens are listed in each manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from data_recipes.common import (
    BadEntries,
    BadInputError,
    ConversionReport,
    DuplicateKeyError,
    SampleKeys,
    add_common_args,
    int_at_least,
    jpeg_for,
    load_image,
    load_json_strict,
    parse_size,
    progress,
)
from data_recipes.view_labels import ViewLabelCounts, label_sample
from mose_lightning.data.sample import Sample, encode_jpeg, make_key
from mose_lightning.data.shards import ShardWriter, prepare_output_dirs
from mose_lightning.locks import holds_lock

GROUPS = ("perception", "prediction", "planning", "behavior")
CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
PAIRS = (("CAM_FRONT_LEFT", "CAM_FRONT"), ("CAM_FRONT_RIGHT", "CAM_BACK_RIGHT"), ("CAM_BACK", "CAM_BACK_LEFT"))
VIEW_MODES = ("all", "paired", "front")
QA_META_FIELDS = ("C", "con_up", "con_down", "cluster", "layer")

_TAG_RE = re.compile(r"<(c\d+),(CAM_[A-Z_]+),(-?[\d.]+),(-?[\d.]+)>")


def parse_tags(text: str) -> List[Dict[str, Any]]:
    """Object tags `<c1,CAM_BACK,1088.3,497.5>` of a question or answer, in order of appearance."""
    return [{"tag": m.group(0), "id": m.group(1), "camera": m.group(2), "x": float(m.group(3)), "y": float(m.group(4))}
            for m in _TAG_RE.finditer(text or "")]


def cameras_for(views: str) -> Tuple[str, ...]:
    if views == "front":
        return ("CAM_FRONT",)
    return CAMERAS


def pair_side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Left|right on one canvas, the right image scaled to the left one's height (aspect ratio kept)."""
    h = left.height
    if right.height != h:
        right = right.resize((max(1, round(right.width * h / right.height)), h), Image.BICUBIC)
    canvas = Image.new("RGB", (left.width + right.width, h))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def holdout_frames(frames: Sequence[str], k: int, seed: int) -> List[str]:
    """The test frames: round(n/k) tokens drawn by `seed` from the sorted list (order of the file irrelevant)."""
    if k < 2:
        raise ValueError(f"drivelm: holdout must be >= 2 (1/K of the frames go to test), got {k}")
    pool = sorted(frames)
    n_test = max(1, round(len(pool) / k)) if len(pool) > 1 else 0
    rng = random.Random(f"drivelm-holdout:{seed}")
    rng.shuffle(pool)
    return sorted(pool[:n_test])


def default_image_root(json_file: Path) -> Path:
    """The DriveLM folder holding both QA_dataset_nus/ (the JSON's folder) and nuscenes/ (the images)."""
    return Path(os.path.abspath(json_file)).parent.parent


def image_path(frame_dir: Path, rel: str, image_root: Optional[Path]) -> Path:
    """Where an image path of the JSON points; ValueError when it leaves `image_root` (None: anywhere allowed).

    Checked on the path as written (`..` collapsed, symbolic links not followed), so a dataset whose nuscenes/
    folder is a link to another disk stays inside its root, while an absolute path or one climbing out with
    `../..` does not."""
    joined = Path(os.path.normpath(os.path.join(os.path.abspath(frame_dir), rel)))
    if image_root is not None:
        root = Path(os.path.normpath(os.path.abspath(image_root)))
        if os.path.isabs(rel) or not joined.is_relative_to(root):
            raise ValueError(f"{rel!r} lies outside the dataset root {root} (pass --image-root to name the root, or "
                             f"--allow-outside-root to read it anyway)")
    return joined


def _frame_views(frame_dir: Path, image_paths: Dict[str, str], views: str, resize: Optional[Tuple[int, int]],
                 image_root: Optional[Path] = None):
    """[(view name, jpeg bytes)] for one key frame; raises FileNotFoundError/ValueError naming the camera."""
    loaded = {}
    for cam in cameras_for(views):
        rel = image_paths.get(cam)
        if not isinstance(rel, str) or not rel:
            raise ValueError(f"image_paths.{cam}: expected a path, got {rel!r}")
        try:
            path = image_path(frame_dir, rel, image_root)
        except ValueError as err:
            raise ValueError(f"image_paths.{cam}: {err}") from None
        try:
            loaded[cam] = load_image(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image_paths.{cam}: image not found: {path}") from None
        except Exception as err:  # PIL raises several unrelated types for broken files
            raise ValueError(f"image_paths.{cam}: image {path} does not decode: {err}") from None
    if views == "paired":
        out = []
        for left, right in PAIRS:
            limg, rimg = loaded[left][1], loaded[right][1]
            if resize:
                limg, rimg = limg.resize(resize, Image.BICUBIC), rimg.resize(resize, Image.BICUBIC)
            out.append((f"{left}+{right}", encode_jpeg(pair_side_by_side(limg, rimg), 90)))
        return out
    return [(cam, jpeg_for(loaded[cam][0], loaded[cam][1], resize)) for cam in cameras_for(views)]


@holds_lock("out_dir", "mose data drivelm")
def convert_drivelm(
    json_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    views: str = "all",
    holdout: Optional[int] = None,
    seed: int = 0,
    labeled: bool = True,
    resize: Optional[Tuple[int, int]] = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    maxcount: int = 1000,
    show_progress: Optional[bool] = None,
    image_root: Optional[str | os.PathLike] = None,
    allow_outside_root: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert a DriveLM-nuScenes JSON to shards in out_dir (or out_dir/train + out_dir/test with holdout).

    Image paths must stay inside `image_root` (default: the folder above the JSON's, which holds nuscenes/)
    unless `allow_outside_root`; a file that yields no QA sample is bad input unless `allow_empty`."""
    if views not in VIEW_MODES:
        raise ValueError(f"drivelm: views must be one of {list(VIEW_MODES)}, got {views!r}")
    json_file = Path(json_file)
    try:
        data = load_json_strict(json_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"drivelm: {json_file} not found") from None
    except DuplicateKeyError as err:
        raise BadInputError(f"{json_file}: {err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInputError(f"{json_file}: not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{json_file}: expected an object {{scene_token: scene}}, got {type(data).__name__}")
    bad = BadEntries(skip_bad)
    keys = SampleKeys(bad)
    root = None if allow_outside_root else (Path(image_root) if image_root else default_image_root(json_file))

    # Pass 1: the key frames, so the holdout is drawn over frames before anything is written.
    frames: List[Tuple[str, str, Dict[str, Any], str]] = []
    scene_of: Dict[str, str] = {}
    for scene_token, scene in data.items():
        key_frames = scene.get("key_frames") if isinstance(scene, dict) else None
        if not isinstance(key_frames, dict):
            bad.report(json_file, f"scene {scene_token}", "expected an object with `key_frames`", samples=0)
            continue
        description = scene.get("scene_description") if isinstance(scene.get("scene_description"), str) else None
        for frame_token, frame in key_frames.items():
            if frame_token in scene_of:
                qa = frame.get("QA") if isinstance(frame, dict) else None
                n_qas = sum(len(v) for v in qa.values() if isinstance(v, list)) if isinstance(qa, dict) else 0
                bad.report(json_file, f"scene {scene_token} / frame {frame_token}",
                           f"the frame token is also a key frame of scene {scene_of[frame_token]} (sample keys are "
                           f"built from the frame token)", samples=n_qas)
                continue
            scene_of[frame_token] = scene_token
            frames.append((scene_token, frame_token, frame, description))

    out_dir = Path(out_dir)
    if holdout:
        test_frames = set(holdout_frames([f[1] for f in frames], holdout, seed))
        dirs = {"train": out_dir / "train", "test": out_dir / "test"}
    else:
        test_frames = set()
        dirs = {"": out_dir}
    prepare_output_dirs(list(dirs.values()), overwrite=overwrite)
    writers = {name: ShardWriter(path, prefix=name or "drivelm", maxcount=maxcount) for name, path in dirs.items()}
    frames_of = {name: [] for name in dirs}
    view_counts = {name: ViewLabelCounts() for name in dirs}
    try:
        for scene_token, frame_token, frame, description in progress(frames, desc="DriveLM frames", enabled=show_progress):
            split = ("test" if frame_token in test_frames else "train") if holdout else ""
            samples = _frame_samples(json_file, scene_token, frame_token, frame, description, views, resize, labeled, bad,
                                     root)
            samples = [s for s in samples if keys.claim(s.key, json_file, s.source["entry"])]
            if samples:
                frames_of[split].append(frame_token)
            for sample in samples:
                sample.source["split"] = split or None
                label_sample(sample, view_counts[split])
                writers[split].write(sample)
        if not allow_empty and not any(w.num_samples for w in writers.values()):
            raise BadInputError(f"{json_file}: no QA sample to write ({len(frames)} key frames, "
                                f"{bad.num_samples} samples skipped); pass --allow-empty to write an empty set")
        for writer in writers.values():
            writer.close()
        common = {
            "dataset": "drivelm",
            "json": str(json_file),
            "views": views,
            "view_names": _view_names(views),
            "resize": list(resize) if resize else None,
            "holdout": {"k": holdout, "seed": seed} if holdout else None,
            **bad.manifest_fields(),
        }
        counts = {}
        for name, writer in writers.items():  # manifests last, once every split's shards are on disk
            manifest = writer.commit({**common, "split": name or None, "frames": sorted(frames_of[name]),
                                      "view_labels": view_counts[name].to_dict(),
                                      "view_label_sets": view_counts[name].label_sets_manifest()})
            counts[name] = manifest["tasks"]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    report = ConversionReport(str(out_dir), counts, bad.entries)
    for name, view_count in view_counts.items():
        report.extra[f"view labels{' (' + name + ')' if name else ''}"] = view_count.summary()
    if holdout:
        report.extra["frames"] = {name: len(v) for name, v in frames_of.items()}
    return report


def _view_names(views: str) -> List[str]:
    if views == "paired":
        return [f"{a}+{b}" for a, b in PAIRS]
    return list(cameras_for(views))


def _frame_samples(
    json_file: Path, scene_token: str, frame_token: str, frame: Any, description: Optional[str], views: str,
    resize: Optional[Tuple[int, int]], labeled: bool, bad: BadEntries, image_root: Optional[Path] = None,
) -> List[Sample]:
    where = f"scene {scene_token} / frame {frame_token}"
    if not isinstance(frame, dict) or not isinstance(frame.get("QA"), dict) or not isinstance(frame.get("image_paths"), dict):
        bad.report(json_file, where, "expected an object with `QA` and `image_paths`", samples=0)
        return []
    qa = frame["QA"]
    n_qas = sum(len(v) for v in qa.values() if isinstance(v, list))
    try:
        images = _frame_views(json_file.parent, frame["image_paths"], views, resize, image_root)
    except (FileNotFoundError, ValueError) as err:
        bad.report(json_file, where, str(err), samples=n_qas)
        return []
    key_objects = frame.get("key_object_infos") if isinstance(frame.get("key_object_infos"), dict) else {}
    out: List[Sample] = []
    unknown = [g for g in qa if g not in GROUPS]
    for group in unknown:
        items = qa[group]
        bad.report(json_file, f"{where} / QA.{group}", f"unknown QA group; expected one of {list(GROUPS)}",
                   samples=len(items) if isinstance(items, list) else 0)
    for group in GROUPS:
        items = qa.get(group, [])
        if not isinstance(items, list):
            bad.report(json_file, f"{where} / QA.{group}", f"expected a list of QA items, got {type(items).__name__}", samples=0)
            continue
        for i, item in enumerate(items):
            entry = f"{where} / QA.{group}[{i}]"
            if not isinstance(item, dict):
                bad.report(json_file, entry, f"expected an object with Q and A, got {type(item).__name__}")
                continue
            question = item.get("Q")
            answer = item.get("A")
            if not isinstance(question, str) or not question.strip():
                bad.report(json_file, entry, f"Q: expected a non-empty string, got {question!r}")
                continue
            if isinstance(answer, str) and answer.strip():
                answer = answer.strip()
            elif labeled:
                bad.report(json_file, entry, f"A: expected a non-empty string, got {answer!r}")
                continue
            else:
                answer = None
            out.append(
                Sample(
                    key=make_key("drivelm", frame_token, group, f"{i:03d}"),
                    dataset="drivelm",
                    task=group,
                    question=question.strip(),
                    answer=answer,
                    views=[name for name, _ in images],
                    images=[blob for _, blob in images],
                    source={
                        "file": str(json_file),
                        "entry": entry,
                        "scene_token": scene_token,
                        "frame_token": frame_token,
                        "group": group,
                        "index": i,
                        "image_paths": {cam: frame["image_paths"].get(cam) for cam in CAMERAS},
                        "tags": parse_tags(question) + [t for t in parse_tags(answer or "") if t["tag"] not in question],
                        "key_object_infos": key_objects,
                        "qa_meta": {k: item.get(k) for k in QA_META_FIELDS if k in item},
                        "scene_description": description,
                    },
                )
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mose data drivelm", description="Convert DriveLM-nuScenes QA JSON to WebDataset shards.")
    p.add_argument("--json", required=True, help="DriveLM-nuScenes v1.1 JSON (image paths resolve relative to its folder)")
    p.add_argument("--out", required=True)
    p.add_argument("--views", choices=VIEW_MODES, default="all")
    p.add_argument("--holdout", type=int_at_least(2), default=None, metavar="K", help="put 1/K of the key frames into OUT/test, the rest into OUT/train")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout draw")
    p.add_argument("--unlabeled", action="store_true", help="questions without answers (answer null) are fine")
    p.add_argument("--resize", type=parse_size, default=None, metavar="WxH", help="scale every camera image (default: keep)")
    p.add_argument("--image-root", default=None, help="folder every image path must stay inside (default: the folder above the JSON's)")
    p.add_argument("--allow-outside-root", action="store_true", help="read image paths outside the image root too (absolute, ../..)")
    p.add_argument("--allow-empty", action="store_true", help="write an empty shard set when the file yields no QA sample")
    add_common_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> ConversionReport:
    args = build_parser().parse_args(argv)
    report = convert_drivelm(
        args.json, args.out, views=args.views, holdout=args.holdout, seed=args.seed, labeled=not args.unlabeled,
        resize=args.resize, skip_bad=args.skip_bad, overwrite=args.overwrite, maxcount=args.maxcount,
        show_progress=args.progress, image_root=args.image_root, allow_outside_root=args.allow_outside_root,
        allow_empty=args.allow_empty,
    )
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
