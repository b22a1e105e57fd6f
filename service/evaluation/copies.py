"""A Copydays-like "strong" copy generator: deterministic (seeded), Pillow only.

DINO evaluates copy detection on the "strong" subset of INRIA Copydays (Caron et al. 2021, Sec.
4.2, Table 7; Douze et al. 2009): 229 copies of 157 holiday photos, each transformed by hand with
several strong edits at once (crops, rotations, blur, paint, print-and-scan, heavy JPEG), searched
among the originals and 10k distractor images. Copydays cannot be shipped here, so this module
makes a set in its spirit from any photos: every copy combines

- always: a **crop** keeping 30-80% of the area (random aspect 3:4 to 4:3, random position) and
  **JPEG** re-encoding at quality 10-30;
- 2 to 4 of: a **rotation** (+-10-30 degrees with black corners, or 90/270 degrees), **mirroring**,
  a **colour change** (brightness/contrast/saturation/hue jitter, or greyscale), a Gaussian **blur**
  (1-2.5% of the shorter side), and an **overlay**: **text** drawn with ``PIL.ImageDraw`` or a
  **patch** pasted from another image (a distractor: pasting another *original* would make the copy
  a copy of two originals).

Edits are applied in a fixed order (crop, rotation, mirror, colour, blur, overlay, JPEG): the overlay
comes after the blur so that it stays sharp, as a caption added to a reposted photo would.

Determinism: :func:`plan_copy` draws every parameter from a ``random.Random`` seeded with a string
made of the seed, the original's name and the copy number (Python's string seeding does not depend
on ``PYTHONHASHSEED``), as fractions of the image size, before any pixel is touched: the plan of a
copy depends neither on the other copies nor on the order in which they are made, and
:func:`render_copy` turns a plan and an image into the same JPEG bytes every time (same Pillow).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

#: every kind of edit, in the order they are applied
EDIT_KINDS = ("crop", "rotate", "rotate90", "mirror", "jitter", "greyscale", "blur", "text", "patch", "jpeg")
#: the optional edits, in groups of alternatives: each copy gets 2 to 4 groups, one kind of each
OPTIONAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("rotate", "rotate90"),
    ("mirror",),
    ("jitter", "greyscale"),
    ("blur",),
    ("text", "patch"),
)
#: captions of the text overlay
WORDS = (
    "COPY",
    "DINO",
    "breaking news",
    "LOL",
    "SALE -50%",
    "(c) 2021",
    "repost",
    "www.example.com",
    "#nofilter",
    "original?",
    "look at this",
    "share!",
)
#: quality of the final encoding of a copy planned without the "jpeg" edit
LOSSLESS_ENOUGH_QUALITY = 95


@dataclass(frozen=True)
class Edit:
    """One edit of a copy: its kind and its parameters (fractions of the image size, angles, ...)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}


@dataclass(frozen=True)
class CopyPlan:
    """Everything that defines one copy of one original, drawn before any pixel is touched."""

    original: str  #: the original's name (its path relative to the originals folder)
    index: int  #: copy number of this original
    seed: int
    edits: tuple[Edit, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(edit.kind for edit in self.edits)

    def to_json(self) -> dict[str, Any]:
        return {"original": self.original, "copy": self.index, "edits": [e.to_json() for e in self.edits]}


def _rng(seed: int, original: str, index: int) -> random.Random:
    return random.Random(f"dino-copydetect:{seed}:{original}:{index}")


def _params(kind: str, rng: random.Random, donors: int) -> dict[str, Any]:
    """The random parameters of one edit."""
    if kind == "crop":
        return {
            "area": rng.uniform(0.3, 0.8),
            "aspect": math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3))),
            "x": rng.random(),
            "y": rng.random(),
        }
    if kind == "rotate":
        return {"angle": rng.choice((-1, 1)) * rng.uniform(10, 30)}
    if kind == "rotate90":
        return {"angle": rng.choice((90, 270))}
    if kind == "jitter":
        return {
            "brightness": rng.uniform(0.6, 1.4),
            "contrast": rng.uniform(0.6, 1.4),
            "saturation": rng.uniform(0.3, 1.7),
            "hue": rng.uniform(-0.1, 0.1),
        }
    if kind == "blur":
        return {"radius": rng.uniform(0.01, 0.025)}  # of the shorter side
    if kind == "text":
        return {
            "text": " ".join(rng.sample(WORDS, rng.randint(1, 3))),
            "size": rng.uniform(0.08, 0.18),  # of the height
            "x": rng.random(),
            "y": rng.random(),
            "colour": [rng.randrange(256) for _ in range(3)],
        }
    if kind == "patch":
        return {
            "donor": rng.randrange(donors) if donors else 0,
            "area": rng.uniform(0.1, 0.3),  # of the copy
            "source_area": rng.uniform(0.25, 0.6),  # of the donor
            "source_x": rng.random(),
            "source_y": rng.random(),
            "x": rng.random(),
            "y": rng.random(),
        }
    if kind == "jpeg":
        return {"quality": rng.randint(10, 30)}
    if kind in ("mirror", "greyscale"):
        return {}
    raise ValueError(f"unknown edit {kind!r}; the kinds are {', '.join(EDIT_KINDS)}")


def plan_copy(
    original: str, index: int, seed: int = 0, *, donors: int = 0, kinds: Sequence[str] | None = None
) -> CopyPlan:
    """The plan of copy ``index`` of ``original``: crop + JPEG + 2 to 4 optional edits (or exactly
    ``kinds``, in the canonical order, for tests and figures). ``donors`` is the number of images
    that patches may come from (0: no patch overlays)."""
    rng = _rng(seed, original, index)
    if kinds is None:
        groups = rng.sample(OPTIONAL_GROUPS, rng.randint(2, 4))
        chosen = {"crop", "jpeg"}
        for group in groups:
            options = [kind for kind in group if kind != "patch" or donors]
            # rotations: half small angles, half quarter turns; colour: greyscale one time in three
            weights = [1.0 if kind != "greyscale" else 0.5 for kind in options]
            chosen.add(rng.choices(options, weights)[0])
    else:
        chosen = set(kinds)
        unknown = chosen - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown edit {sorted(unknown)[0]!r}; the kinds are {', '.join(EDIT_KINDS)}")
        if "patch" in chosen and not donors:
            raise ValueError("a patch overlay needs donor images")
    edits = tuple(Edit(kind, _params(kind, rng, donors)) for kind in EDIT_KINDS if kind in chosen)
    return CopyPlan(original, index, seed, edits)


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _crop(img: Image.Image, p: dict[str, Any]) -> Image.Image:
    width, height = img.size
    area = p["area"] * width * height
    crop_w = min(width, max(1, round(math.sqrt(area * p["aspect"]))))
    crop_h = min(height, max(1, round(math.sqrt(area / p["aspect"]))))
    x0 = round(p["x"] * (width - crop_w))
    y0 = round(p["y"] * (height - crop_h))
    return img.crop((x0, y0, x0 + crop_w, y0 + crop_h))


def _jitter(img: Image.Image, p: dict[str, Any]) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(p["brightness"])
    img = ImageEnhance.Contrast(img).enhance(p["contrast"])
    img = ImageEnhance.Color(img).enhance(p["saturation"])
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(p["hue"] * 256)) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font (a bitmap font, whatever the size, without FreeType)
    return ImageFont.load_default(size=size)


def _text(img: Image.Image, p: dict[str, Any]) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    size = max(6, round(p["size"] * img.height))
    font = _font(size)
    stroke = max(1, size // 12)
    left, top, right, bottom = draw.textbbox((0, 0), p["text"], font=font, stroke_width=stroke)
    if right - left > img.width and size > 6:  # a caption wider than the image: smaller, so it fits
        size = max(6, int(size * img.width / (right - left)))
        font, stroke = _font(size), max(1, size // 12)
        left, top, right, bottom = draw.textbbox((0, 0), p["text"], font=font, stroke_width=stroke)
    x = p["x"] * max(0, img.width - (right - left)) - left
    y = p["y"] * max(0, img.height - (bottom - top)) - top
    colour = tuple(p["colour"])
    outline = (0, 0, 0) if sum(colour) > 3 * 128 else (255, 255, 255)
    draw.text((x, y), p["text"], fill=colour, font=font, stroke_width=stroke, stroke_fill=outline)
    return img


def _patch(img: Image.Image, p: dict[str, Any], donors: Sequence[Image.Image]) -> Image.Image:
    if not donors:
        raise ValueError("a patch overlay needs donor images")
    donor = donors[p["donor"] % len(donors)]
    side = math.sqrt(p["source_area"])
    src_w, src_h = max(1, round(donor.width * side)), max(1, round(donor.height * side))
    sx = round(p["source_x"] * (donor.width - src_w))
    sy = round(p["source_y"] * (donor.height - src_h))
    piece = donor.crop((sx, sy, sx + src_w, sy + src_h))
    # the pasted piece covers `area` of the copy, with the donor region's aspect ratio
    scale = math.sqrt(p["area"] * img.width * img.height / (src_w * src_h))
    dst_w = min(img.width, max(1, round(src_w * scale)))
    dst_h = min(img.height, max(1, round(src_h * scale)))
    piece = piece.resize((dst_w, dst_h), Image.Resampling.BILINEAR)
    img = img.copy()
    img.paste(piece, (round(p["x"] * (img.width - dst_w)), round(p["y"] * (img.height - dst_h))))
    return img


def apply_edits(image: Image.Image, plan: CopyPlan, donors: Sequence[Image.Image] = ()) -> Image.Image:
    """The edited RGB image of ``plan`` (every edit but the final JPEG encoding)."""
    img = image.convert("RGB")
    for edit in plan.edits:
        p = edit.params
        if edit.kind == "crop":
            img = _crop(img, p)
        elif edit.kind == "rotate":
            img = img.rotate(p["angle"], Image.Resampling.BICUBIC, expand=True, fillcolor=(0, 0, 0))
        elif edit.kind == "rotate90":
            turn = Image.Transpose.ROTATE_90 if p["angle"] == 90 else Image.Transpose.ROTATE_270
            img = img.transpose(turn)
        elif edit.kind == "mirror":
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif edit.kind == "jitter":
            img = _jitter(img, p)
        elif edit.kind == "greyscale":
            img = img.convert("L").convert("RGB")
        elif edit.kind == "blur":
            img = img.filter(ImageFilter.GaussianBlur(max(0.5, p["radius"] * min(img.size))))
        elif edit.kind == "text":
            img = _text(img, p)
        elif edit.kind == "patch":
            img = _patch(img, p, donors)
    return img


def render_copy(image: Image.Image, plan: CopyPlan, donors: Sequence[Image.Image] = ()) -> bytes:
    """The copy as JPEG bytes: the edits of ``plan`` applied to ``image``, encoded at the planned
    quality (quality 95 for a plan without the "jpeg" edit)."""
    img = apply_edits(image, plan, donors)
    quality = next((e.params["quality"] for e in plan.edits if e.kind == "jpeg"), LOSSLESS_ENOUGH_QUALITY)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
