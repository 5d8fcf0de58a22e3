"""CODA-LM -> WebDataset shards in the sample format of mose_lightning/data/sample.py.

Expected layout (the official one; the annotation folder can be moved with --ann-dir):

    CODA_ROOT/
      val/images/<id>.jpg            CODA2022 val images  (CODA-LM Train)
      test/images/<id>.jpg           CODA2022 test images (CODA-LM Val, Test, Mini)
      CODA-LM/<Split>/<prefix>_<id>.json   one annotation file per image; prefix = val | test

Each annotation file gives three kinds of samples (one per QA pair), views = ["front"]:
  general     answer = general_perception["description and explanation"]
  regional    one per region_perception entry; the box is drawn as a red rectangle (width 2) on a copy of the
              image (box_encoding="red_box") or left out of the image ("none"; the question then names the box);
              `region` = the box [x, y, w, h] in original pixels, `category` = super-class of category_name
  suggestion  answer = driving_suggestion
The Test split has no released answers: its samples get answer null. On other splits a missing or empty answer is
bad input. The question texts are parameters: the defaults are this project's wording; pass the official texts to
reproduce published numbers exactly.

Bad input (missing/undecodable image, unreadable JSON, a key twice in one JSON object, empty answer, box outside
the image, two entries whose sample keys coincide) stops the run with a message naming the file and entry, or with
skip_bad is skipped and listed in the manifest. A missing image or a duplicate JSON key skips the whole file; a bad
region or answer, or a key collision (the later entry), skips only that sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from data_recipes.common import (
    BadEntries,
    ConversionReport,
    DuplicateKeyError,
    SampleKeys,
    add_common_args,
    jpeg_for,
    load_image,
    load_json_strict,
    parse_size,
    progress,
)
from mose_lightning.data.sample import Sample, encode_jpeg, make_key
from mose_lightning.data.shards import ShardWriter, prepare_output_dirs
from mose_lightning.locks import holds_lock

SPLITS = ("Train", "Val", "Test", "Mini")
BOX_ENCODINGS = ("red_box", "none")

DEFAULT_QUESTION_GENERAL = (
    "This image shows a traffic scene from the ego car's point of view. Identify the objects that strongly "
    "influence how the ego car should drive (vehicles, vulnerable road users, traffic signs, traffic lights, "
    "traffic cones, barriers and other objects), describe each of them and explain why it matters."
)
DEFAULT_QUESTION_SUGGESTION = (
    "This image shows a traffic scene from the ego car's point of view. Give driving suggestions for the ego car "
    "in this scene."
)
DEFAULT_QUESTION_REGIONAL = (
    "Describe the object inside the red rectangle in the image and explain why it affects the ego car's driving."
)
# Used when the box is not drawn: the question has to carry the box. <region> stays in the text for the encoder,
# which writes the box in the coordinates the backbone reads (mose_lightning/backbones/boxes.py); {box} in a
# custom template -> "[x, y, w, h]" in original pixels.
DEFAULT_QUESTION_REGIONAL_NOBOX = (
    "Describe the object in the image region <region> and explain why it affects the ego car's driving."
)

# How far (pixels) a box may reach past the image border before it counts as bad: annotation tools round.
BOX_TOLERANCE = 2.0
BOX_COLOR = (255, 0, 0)
BOX_WIDTH = 2

# CODA2022 category names -> the 7 CODA-LM super-classes of per-class reporting. Names are compared after
# lower-casing and turning spaces/hyphens into underscores; anything not listed becomes miscellaneous and is counted
# in the manifest (`unknown_categories`) so the table can be extended.
CATEGORY_TABLE: Dict[str, str] = {
    **{n: "vehicle" for n in (
        "car", "truck", "bus", "van", "suv", "tricycle", "trailer", "tractor", "machinery_vehicle",
        "construction_vehicle", "engineering_vehicle", "excavator", "crane", "forklift", "ambulance", "police_car",
        "fire_truck", "recreational_vehicle", "camper", "vehicle", "other_vehicle", "train", "tram", "pickup",
        "pickup_truck", "minibus", "cement_mixer", "tank_truck", "sprinkler", "sanitation_vehicle",
    )},
    **{n: "vru" for n in (
        "pedestrian", "person", "people", "child", "cyclist", "bicycle", "bike", "motorcycle", "motorcyclist",
        "motorbike", "scooter", "e_scooter", "moped", "rider", "stroller", "wheelchair", "pushchair", "cart",
        "hand_cart", "handcart", "tricyclist", "dog", "cat", "animal", "horse", "cow", "sheep", "bird",
        "vulnerable_road_user",
    )},
    **{n: "traffic_sign" for n in (
        "traffic_sign", "sign", "warning_sign", "stop_sign", "speed_limit_sign", "road_sign", "guide_sign",
        "construction_sign", "warning_triangle", "triangle_warning_sign", "direction_sign", "arrow_board",
    )},
    **{n: "traffic_light" for n in ("traffic_light", "traffic_signal", "signal_light", "traffic_lights")},
    **{n: "traffic_cone" for n in ("traffic_cone", "cone", "cones", "traffic_cones")},
    **{n: "barrier" for n in (
        "barrier", "barricade", "bollard", "water_horse", "water_barrier", "fence", "guardrail", "guard_rail",
        "road_block", "roadblock", "concrete_block", "jersey_barrier", "traffic_barrier", "construction_barrier",
        "isolation_pier", "anti_collision_barrel", "crash_barrel", "barrel", "separator", "traffic_bar",
    )},
    **{n: "miscellaneous" for n in (
        "misc", "miscellaneous", "debris", "garbage", "trash", "garbage_bin", "trash_can", "dustbin",
        "plastic_bag", "stone", "rock", "box", "carton", "tire", "pole", "sentry_box", "traffic_box",
        "traffic_island", "phone_booth", "bag", "other", "others", "other_objects", "obstacle", "pipe", "wood",
        "branch", "bucket", "chair", "table", "umbrella", "manhole", "pothole",
    )},
}


def category_super_class(name: str) -> Tuple[str, bool]:
    """(super-class, known) for a CODA category name; unknown names map to miscellaneous."""
    norm = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    if norm in CATEGORY_TABLE:
        return CATEGORY_TABLE[norm], True
    return "miscellaneous", False


def default_ann_dir(root: Path, split: str) -> Path:
    """CODA_ROOT/CODA-LM/<Split> (official); CODA_ROOT/<Split> when the root is the CODA-LM folder itself."""
    official = root / "CODA-LM" / split
    if official.is_dir():
        return official
    flat = root / split
    return flat if flat.is_dir() else official


def _text(value) -> Optional[str]:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _check_box(box, width: int, height: int) -> Optional[str]:
    """Why a box is bad, or None when it is a usable [x, y, w, h] inside the image."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"box: expected [x, y, w, h], got {box!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return f"box: expected 4 finite numbers, got {box!r}"
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return f"box: expected positive width and height, got {box!r}"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {box!r} lies outside the image ({width}x{height})"
    return None


def draw_box(img, box: Sequence[float]):
    """A copy of the image with the box as a red rectangle of width 2 (the official CODA-LM encoding)."""
    out = img.copy()
    x, y, w, h = box
    ImageDraw.Draw(out).rectangle([x, y, x + w, y + h], outline=BOX_COLOR, width=BOX_WIDTH)
    return out


@holds_lock("out_dir", "mose data coda-lm")
def convert_coda_lm(
    root: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    ann_dir: Optional[str | os.PathLike] = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    box_encoding: str = "red_box",
    question_general: str = DEFAULT_QUESTION_GENERAL,
    question_regional: str = DEFAULT_QUESTION_REGIONAL,
    question_regional_nobox: str = DEFAULT_QUESTION_REGIONAL_NOBOX,
    question_suggestion: str = DEFAULT_QUESTION_SUGGESTION,
    resize: Optional[Tuple[int, int]] = None,
    maxcount: int = 1000,
    show_progress: Optional[bool] = None,
) -> ConversionReport:
    """Convert one CODA-LM split into `out_dir` (shards + manifest); returns counts per task and what was skipped."""
    if split not in SPLITS:
        raise ValueError(f"coda_lm: split must be one of {list(SPLITS)}, got {split!r}")
    if box_encoding not in BOX_ENCODINGS:
        raise ValueError(f"coda_lm: box_encoding must be one of {list(BOX_ENCODINGS)}, got {box_encoding!r}")
    root = Path(root)
    ann = Path(ann_dir) if ann_dir is not None else default_ann_dir(root, split)
    if not ann.is_dir():
        raise FileNotFoundError(
            f"coda_lm: annotation folder {ann} not found; expected CODA_ROOT/CODA-LM/{split}/<prefix>_<id>.json "
            f"(or pass --ann-dir)"
        )
    files = sorted(p for p in ann.iterdir() if p.is_file() and p.suffix == ".json")
    if not files:
        raise FileNotFoundError(f"coda_lm: no annotation files (*.json) in {ann}")
    labeled = split != "Test"
    out_dir = Path(out_dir)
    prepare_output_dirs([out_dir], overwrite=overwrite)
    bad = BadEntries(skip_bad)
    keys = SampleKeys(bad)
    categories: Counter = Counter()
    unknown: Counter = Counter()
    writer = ShardWriter(out_dir, prefix=split.lower(), maxcount=maxcount)
    try:
        for path in progress(files, desc=f"CODA-LM {split}", enabled=show_progress):
            for sample in _samples_of_file(
                path, root, split, labeled, bad, box_encoding, resize, categories, unknown,
                question_general, question_regional, question_regional_nobox, question_suggestion,
            ):
                if keys.claim(sample.key, path, sample.source["entry"]):
                    writer.write(sample)
        manifest = writer.commit(
            {
                "dataset": "coda_lm",
                "split": split,
                "annotation_dir": str(ann),
                "root": str(root),
                "box_encoding": box_encoding,
                "resize": list(resize) if resize else None,
                "categories": dict(sorted(categories.items())),
                "unknown_categories": dict(sorted(unknown.items())),
                **bad.manifest_fields(),
            }
        )
    except BaseException:
        writer.abort()
        raise
    report = ConversionReport(str(out_dir), {"": manifest["tasks"]}, bad.entries)
    if unknown:
        report.extra["unknown categories -> miscellaneous"] = dict(sorted(unknown.items()))
    return report


def _samples_of_file(
    path: Path, root: Path, split: str, labeled: bool, bad: BadEntries, box_encoding: str,
    resize: Optional[Tuple[int, int]], categories: Counter, unknown: Counter,
    q_general: str, q_regional: str, q_regional_nobox: str, q_suggestion: str,
) -> List[Sample]:
    stem = path.stem
    if "_" not in stem:
        bad.report(path, "<file name>", "expected a name <prefix>_<image-id>.json (e.g. val_0001.json)", samples=0)
        return []
    prefix, image_id = stem.split("_", 1)
    try:
        data = load_json_strict(path)
    except DuplicateKeyError as err:
        bad.report(path, "<file>", str(err), samples=0)
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        bad.report(path, "<file>", f"not readable JSON: {err}", samples=0)
        return []
    if not isinstance(data, dict):
        bad.report(path, "<file>", f"expected a JSON object, got {type(data).__name__}", samples=0)
        return []
    regions = data.get("region_perception") or {}
    if not isinstance(regions, dict):
        bad.report(path, "region_perception", f"expected an object of regions, got {type(regions).__name__}", samples=0)
        regions = {}
    image_path = root / prefix / "images" / f"{image_id}.jpg"
    n_samples = 2 + len(regions)
    try:
        raw, img = load_image(image_path)
    except FileNotFoundError:
        bad.report(path, "<image>", f"image not found: {image_path}", samples=n_samples)
        return []
    except Exception as err:  # PIL raises several unrelated types for broken files
        bad.report(path, "<image>", f"image {image_path} does not decode: {err}", samples=n_samples)
        return []
    width, height = img.size
    plain = jpeg_for(raw, img, resize)
    source = {
        "file": str(path),
        "image": str(image_path),
        "split": split,
        "image_id": image_id,
        "prefix": prefix,
        "image_size": [width, height],
        # `region` stays in original pixels; a loader scales it by stored_size / image_size.
        "stored_size": list(resize) if resize else [width, height],
    }
    out: List[Sample] = []

    def make(task: str, tag: str, entry: str, question: str, answer, image: bytes, more_source=None, **kw) -> bool:
        if labeled and answer is None:
            bad.report(path, entry, "answer is missing or empty")
            return False
        out.append(
            Sample(
                key=make_key("coda_lm", split, prefix, image_id, tag),
                dataset="coda_lm",
                task=task,
                question=question,
                answer=answer,
                views=["front"],
                images=[image],
                source={**source, "entry": entry, **(more_source or {})},
                **kw,
            )
        )
        return True

    general = data.get("general_perception")
    general_answer = _text(general.get("description and explanation")) if isinstance(general, dict) else None
    make("general", "general", "general_perception", q_general, general_answer, plain)

    def region_order(k):
        return (0, int(k), "") if str(k).isdigit() else (1, 0, str(k))

    for rk in sorted(regions, key=region_order):
        # A region name with spaces or odd characters is quoted, so that the entry can be told apart from its twin.
        entry = f"region_perception.{rk}" if re.fullmatch(r"[A-Za-z0-9_-]+", str(rk)) else f"region_perception[{rk!r}]"
        region = regions[rk]
        if not isinstance(region, dict):
            bad.report(path, entry, f"expected an object with box/category_name, got {type(region).__name__}")
            continue
        problem = _check_box(region.get("box"), width, height)
        if problem:
            bad.report(path, entry, problem)
            continue
        box = [float(v) for v in region["box"]]
        name = region.get("category_name")
        if not isinstance(name, str) or not name.strip():
            bad.report(path, entry, f"category_name: expected a non-empty string, got {name!r}")
            continue
        category, known = category_super_class(name)
        if box_encoding == "red_box":
            # Drawn at full resolution, then resized: the rectangle stays where the box is in the original.
            boxed = draw_box(img, box)
            image = encode_jpeg(boxed.resize(resize, Image.BICUBIC) if resize else boxed, 90)
            question = q_regional
        else:
            image = plain
            question = q_regional_nobox.format(box="[" + ", ".join(f"{v:.1f}" for v in box) + "]")
        if make("regional", f"region_{rk}", entry, question, _text(region.get("description and explanation")), image,
                more_source={"category_name": name}, region=box, category=category):
            categories[category] += 1
            if not known:
                unknown[name] += 1

    make("suggestion", "suggestion", "driving_suggestion", q_suggestion, _text(data.get("driving_suggestion")), plain)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mose data coda-lm", description="Convert a CODA-LM split to WebDataset shards.")
    p.add_argument("--root", required=True, help="CODA root holding val/images, test/images and CODA-LM/<Split>")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--ann-dir", default=None, help="annotation folder (default: ROOT/CODA-LM/<Split>)")
    p.add_argument("--box-encoding", choices=BOX_ENCODINGS, default="red_box")
    p.add_argument("--resize", type=parse_size, default=None, metavar="WxH", help="store images at this size (default: original)")
    p.add_argument("--question-general", default=DEFAULT_QUESTION_GENERAL)
    p.add_argument("--question-regional", default=DEFAULT_QUESTION_REGIONAL)
    p.add_argument("--question-regional-nobox", default=DEFAULT_QUESTION_REGIONAL_NOBOX, help="used with --box-encoding none; <region> is written in the backbone's box format when encoding, {box} is replaced by [x, y, w, h] in original pixels")
    p.add_argument("--question-suggestion", default=DEFAULT_QUESTION_SUGGESTION)
    add_common_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> ConversionReport:
    args = build_parser().parse_args(argv)
    report = convert_coda_lm(
        args.root, args.split, args.out,
        ann_dir=args.ann_dir, skip_bad=args.skip_bad, overwrite=args.overwrite, box_encoding=args.box_encoding,
        question_general=args.question_general, question_regional=args.question_regional,
        question_regional_nobox=args.question_regional_nobox, question_suggestion=args.question_suggestion,
        resize=args.resize, maxcount=args.maxcount, show_progress=args.progress,
    )
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
