"""`mose predict`: one question about one or more images, answered in a single round, with its skill chain."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from mose_lightning.checkpoint import load_model
from mose_lightning.config import ConfigError
from mose_lightning.data.encode import EncodeSettings, SampleEncoder, collate
from mose_lightning.data.sample import Sample, encode_jpeg
from mose_lightning.evaluation.routing_metrics import skill_chains
from mose_lightning.stages.evaluate import decode_new_tokens


def _with_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The CODA-LM encoding of a region: a red rectangle (width 2) on a copy of the image."""
    x, y, w, h = box
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > image.width or y + h > image.height:
        raise ConfigError(f"--box {list(box)} is not inside the {image.width}x{image.height} image (x,y,w,h)")
    out = image.convert("RGB").copy()
    ImageDraw.Draw(out).rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=2)
    return out


def predict_one(checkpoint: str, images: Sequence[str], question: str, box: Optional[Sequence[float]] = None,
                max_new_tokens: int = 128) -> Tuple[str, List[Dict]]:
    model = load_model(checkpoint)
    model.eval()
    pil = []
    for path in images:
        if not Path(path).is_file():
            raise ConfigError(f"--image {path}: no such file")
        pil.append(Image.open(path).convert("RGB"))
    if box is not None:
        pil[0] = _with_box(pil[0], box)
    sample = Sample(key="predict", dataset="user", task="regional" if box else "general", question=question,
                    answer=None, views=[f"view{i}" for i in range(len(pil))], images=[encode_jpeg(im) for im in pil])
    d = model.cfg.data
    encoder = SampleEncoder(model.adapter, model.processor, model.taxonomy,
                            EncodeSettings(d.image_width, d.image_height, d.max_length, d.overlong,
                                           d.system_prompt or None, with_answer=False))
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    batch = collate([encoder(sample)], tokenizer.pad_token_id, "left")
    generated = model.generate(batch, max_new_tokens)
    chains = skill_chains(generated.routes, model.taxonomy)
    return decode_new_tokens(model, generated.tokens)[0], chains[0] if chains else []
