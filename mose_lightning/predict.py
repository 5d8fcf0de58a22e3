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
                max_new_tokens: int = 128, views_out: Optional[Dict] = None) -> Tuple[str, List[Dict]]:
    """The answer and the skill chain. For a view-routed model the images are its views.names in order (the kept
    views at least), and `views_out` (a dict, when given) receives the views shown and the router's choice."""
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
    settings = EncodeSettings(d.image_width, d.image_height, d.max_length, d.overlong, d.system_prompt or None,
                              with_answer=False)
    if model.views is not None:
        from mose_lightning.data.view_encode import ViewSampleEncoder, collate_views

        names = model.cfg.views.names
        if len(pil) > len(names):
            raise ConfigError(f"--image: {len(pil)} images for a model with the views {names} (one image per view, in order)")
        sample.views = names[: len(pil)]
        encoder = ViewSampleEncoder(model.adapter, model.processor, model.taxonomy, settings, model.cfg.views, len(names))
        batch = collate_views([encoder(sample)])
    else:
        encoder = SampleEncoder(model.adapter, model.processor, model.taxonomy, settings)
        tokenizer = getattr(model.processor, "tokenizer", model.processor)
        batch = collate([encoder(sample)], tokenizer.pad_token_id, "left")
    generated = model.generate(batch, max_new_tokens)
    if generated.views is not None and views_out is not None:
        decision = generated.views.decision
        views_out["shown"] = generated.views.shown[0]
        views_out["choice"] = sorted(zip(decision.classes, decision.probs[0].tolist()), key=lambda e: -e[1])
    chains = skill_chains(generated.routes, model.taxonomy)
    return decode_new_tokens(model, generated.tokens)[0], chains[0] if chains else []
