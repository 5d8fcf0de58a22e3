"""Boxes written into text, in the coordinates each backbone was trained to read.

The data keeps one convention (`Sample.region`: [x, y, w, h] in pixels of the original image). A question that
should name its region in text carries the placeholder `<region>` (the CODA-LM converter writes it with
`box_encoding="none"`), and the encoder replaces it with `region_text(...)` in the backbone's `box_format`:

  norm1000      [x1, y1, x2, y2], integers 0-1000 relative to the image: Qwen2-VL, Qwen3-VL, InternVL
  input_pixels  [x1, y1, x2, y2], absolute pixels of the image as the processor resized it: Qwen2.5-VL
  loc1024       <locY1><locX1><locY2><locX2>, PaliGemma's location tokens: y before x, each coordinate / size in
                1024 bins (round(v * 1023))
  pixels        [x1, y1, x2, y2], pixels of the original image: backbones without a grounding format of their
                own (LLaVA, SmolVLM), so the numbers stay the data's

The default stays CODA-LM's encoding: the box drawn on the image as a red rectangle, no coordinates in the text.
DriveLM's object tags (`<c1,CAM_FRONT,x,y>`) are not converted: they are the benchmark's answer format, scored
by the match metric in the camera's original pixels, so questions and answers keep them as the data has them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

BOX_FORMATS = ("pixels", "norm1000", "input_pixels", "loc1024")
REGION_PLACEHOLDER = "<region>"


def convert_box(box: Sequence[float], image_size: Tuple[int, int], box_format: str,
                input_size: Optional[Tuple[int, int]] = None) -> List[int]:
    """Corner coordinates of `box` ([x, y, w, h] in pixels of an image of `image_size` = (width, height)) in
    `box_format`: [x1, y1, x2, y2], or [y1, x1, y2, x2] bins for loc1024. `input_size`: (width, height) of the
    image the vision tower sees, needed by input_pixels."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box format: expected one of {list(BOX_FORMATS)}, got {box_format!r}")
    x, y, w, h = (float(v) for v in box)
    width, height = image_size
    # Relative corners, clipped: annotation tools round boxes a pixel past the border.
    rel = [min(max(v, 0.0), 1.0) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]
    if box_format == "pixels":
        scale = (width, height)
    elif box_format == "norm1000":
        scale = (1000, 1000)
    elif box_format == "input_pixels":
        if input_size is None:
            raise ValueError("box format input_pixels needs the size of the image the vision tower sees")
        scale = input_size
    else:
        x1, y1, x2, y2 = (round(v * 1023) for v in rel)
        return [y1, x1, y2, x2]
    return [round(rel[0] * scale[0]), round(rel[1] * scale[1]), round(rel[2] * scale[0]), round(rel[3] * scale[1])]


def region_text(box: Sequence[float], image_size: Tuple[int, int], box_format: str,
                input_size: Optional[Tuple[int, int]] = None) -> str:
    values = convert_box(box, image_size, box_format, input_size)
    if box_format == "loc1024":
        return "".join(f"<loc{v:04d}>" for v in values)
    return "[" + ", ".join(str(v) for v in values) + "]"
