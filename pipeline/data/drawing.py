"""Drawing the demo's pictures: every class is a *recipe* (a surface pattern x a hue family
x an object shape, named after exactly that: ``striped_green_disc``), and
:func:`image_bytes` draws one JPEG of one recipe. :mod:`pipeline.data.demo` writes them in
Food-101's layout.

Several classes share a shape, a pattern or a hue, so no single cue gives the class away.
Each image adds nuisance variation: image size and aspect, object position/scale/rotation/
stretch (the object stays large and near the centre, spanning roughly 0.6-1.0 of the shorter
side), colour jitter, a cluttered random background, lighting gradients, brightness/contrast,
Gaussian noise and occasional partial occlusion.

Difficulty was tuned so that a frozen, randomly initialised ResNet50 with a small trained head
(on per-dimension standardised features) scores well above chance but far from 100%.

Drawing is deterministic: each image is drawn from its own RNG seeded with ``(seed, class
index, image index)`` and encoded with a fixed, RNG-drawn JPEG quality and no metadata, so
the same arguments give byte-identical files (the tests hash them: the accuracies depend on
these bytes).
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Hue families (centre hue in [0, 1)); every family is used by several classes.
HUES: dict[str, float] = {
    "red": 0 / 6,
    "yellow": 1 / 6,
    "green": 2 / 6,
    "cyan": 3 / 6,
    "blue": 4 / 6,
    "magenta": 5 / 6,
}
SHAPES = ("disc", "square", "triangle", "ring", "star", "cross")
PATTERNS = ("solid", "striped", "dotted", "checkered")


@dataclass(frozen=True)
class Recipe:
    """What makes a class: its object shape, surface pattern and hue family."""

    pattern: str
    hue: str
    shape: str

    @property
    def name(self) -> str:
        """The class name, e.g. ``striped_green_disc``."""
        return f"{self.pattern}_{self.hue}_{self.shape}"

    @property
    def label(self) -> str:
        """The human-readable name, e.g. ``Striped green disc``."""
        return f"{self.pattern} {self.hue} {self.shape}".capitalize()


def _recipes() -> tuple[Recipe, ...]:
    """144 recipes, every (pattern, hue, shape) once; Food-101's 101 classes fit.

    The first 24 take every (shape, pattern) pair once, each hue family on four classes; each
    further 24 repeat those pairs with every hue moved one family on (so the first 24, and
    with them every demo of up to 24 classes, are what they always were). The order is fixed
    (``classes=N`` takes the first N) and interleaved so that any prefix mixes all shapes,
    patterns and hues.
    """
    hues = tuple(HUES)
    base = []
    for k in range(len(SHAPES) * len(PATTERNS)):
        row, s = divmod(k, len(SHAPES))
        shape = SHAPES[s]
        pattern = PATTERNS[(s + row) % len(PATTERNS)]
        hue = (s + 2 * row + (row >= 3)) % len(hues)
        base.append((pattern, hue, shape))
    return tuple(Recipe(pattern, hues[(hue + shift) % len(hues)], shape)
                 for shift in range(len(hues)) for pattern, hue, shape in base)


RECIPES: tuple[Recipe, ...] = _recipes()
MAX_CLASSES = len(RECIPES)


def class_names(classes: int) -> list[str]:
    """The (sorted) class names of a demo dataset with ``classes`` classes."""
    check_classes(classes)
    return sorted(r.name for r in RECIPES[:classes])


def check_classes(classes: int) -> None:
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(
            f"demo classes must be between 1 and {MAX_CLASSES} (the maximum: one per "
            f"built-in recipe), got {classes}"
        )


# --------------------------------------------------------------------------------------------
# Rendering one image


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Mostly muted clutter colours; one in four is a saturated colour of any hue."""
    sat = rng.uniform(0.5, 1.0) if rng.random() < 0.25 else rng.uniform(0.0, 0.45)
    c = _hsv(rng.random(), sat, rng.uniform(0.15, 0.95))
    return (int(c[0]), int(c[1]), int(c[2]))


def _outline(shape: str, n_circle: int = 48) -> list[np.ndarray]:
    """Polygons (unit size, centred at 0) of ``shape``: [outer, hole?]."""
    if shape in ("disc", "ring"):
        t = np.linspace(0.0, 2 * math.pi, n_circle, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        return [outer, outer * 0.55] if shape == "ring" else [outer]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82]
    if shape == "triangle":
        t = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        return [np.stack([np.cos(t), np.sin(t)], axis=1) * 1.1]
    if shape == "star":
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]
    if shape == "cross":
        a, b = 1.0, 0.34
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
               (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]  # fmt: skip
        return [np.array(pts, dtype=np.float64)]
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Soft-edged pattern weight in [0, 1] over object coordinates ``u, v`` (pixels)."""
    k = 2 * math.pi / period
    if pattern == "solid":
        return np.zeros_like(u)
    if pattern == "striped":
        return np.clip(np.sin(u * k) * 3.0, -1.0, 1.0) * 0.5 + 0.5
    if pattern == "checkered":
        return np.clip(np.sin(u * k) * np.sin(v * k) * 6.0, -1.0, 1.0) * 0.5 + 0.5
    if pattern == "dotted":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        d = np.sqrt(du * du + dv * dv)
        return np.clip((0.3 * period - d) * 1.5 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown pattern {pattern!r}")


def render(recipe: Recipe, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """Draw one RGB image of ``recipe``; every random choice comes from ``rng``."""
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    side = min(w, h)
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]

    # Background: a two-colour gradient in a random direction, then random clutter.
    c1 = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.95))
    c2 = _hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.95))
    ang = rng.uniform(0, 2 * math.pi)
    ramp = xs * np.float32(math.cos(ang)) + ys * np.float32(math.sin(ang))
    ramp -= ramp.min()
    ramp *= np.float32(1.0 / max(float(ramp.max()), 1e-6))
    bg = ramp[..., None] * (c2 - c1)
    bg += c1
    canvas = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 8))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.04, 0.22, size=2) * side
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_random_colour(rng))
    for _ in range(int(rng.integers(1, 7))):
        x0, x1 = rng.uniform(-0.1, 1.1, size=2) * w
        y0, y1 = rng.uniform(-0.1, 1.1, size=2) * h
        width = int(rng.integers(1, max(2, side // 24) + 1))
        draw.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=width)
    blur = float(rng.uniform(0.0, 1.2))
    if blur >= 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    img = np.asarray(canvas, dtype=np.float32)

    # The object: shape mask (2x supersampled), position, scale, rotation, stretch.
    radius = rng.uniform(0.38, 0.5) * side
    stretch = math.exp(rng.uniform(-0.3, 0.3))
    theta = rng.uniform(0, 2 * math.pi)
    cx = rng.uniform(0.38, 0.62) * w
    cy = rng.uniform(0.38, 0.62) * h
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = np.array([radius * stretch, radius / stretch])
    mask_img = Image.new("L", (2 * w, 2 * h), 0)
    mdraw = ImageDraw.Draw(mask_img)
    for fill, poly in zip((255, 0), _outline(recipe.shape), strict=False):
        pts = (poly * scale) @ rot.T + (cx, cy)
        mdraw.polygon([(2 * x, 2 * y) for x, y in pts], fill=fill)
    mask = np.asarray(mask_img.reduce(2), dtype=np.float32)
    mask *= np.float32(1 / 255)

    # Surface: hue family with jitter; the pattern mixes a lighter and a darker tone, and a
    # soft shading gradient runs across the object.
    hue = HUES[recipe.hue] + rng.uniform(-0.03, 0.03)
    sat = rng.uniform(0.55, 1.0)
    base_v = rng.uniform(0.45, 1.0)
    primary = _hsv(hue, sat, base_v)
    if rng.random() < 0.5:
        secondary = _hsv(hue + rng.uniform(-0.02, 0.02), sat * rng.uniform(0.1, 0.4), 0.97)
    else:
        secondary = _hsv(hue + rng.uniform(-0.02, 0.02), sat, base_v * rng.uniform(0.15, 0.4))
    period = max(4.0, rng.uniform(0.22, 0.45) * radius)
    pang = theta + rng.uniform(-0.5, 0.5)
    du, dv = xs - np.float32(cx), ys - np.float32(cy)
    cp, sp = np.float32(math.cos(pang)), np.float32(math.sin(pang))
    u = du * cp + dv * sp + np.float32(rng.uniform(0, period))
    v = dv * cp - du * sp + np.float32(rng.uniform(0, period))
    pat = _pattern(recipe.pattern, u, v, period)
    k = rng.uniform(-0.25, 0.25) / radius
    shade = np.clip(1.0 + du * np.float32(k * math.cos(ang)) + dv * np.float32(k * math.sin(ang)),
                    0.5, 1.5)  # fmt: skip
    # img += mask * (shade * (primary + pat * (secondary - primary)) - img)
    obj = pat[..., None] * (secondary - primary)
    obj += primary
    obj *= shade[..., None]
    obj -= img
    obj *= mask[..., None]
    img += obj

    # Occasional partial occlusion by a random-coloured rectangle or blob.
    if rng.random() < 0.25:
        occ = Image.new("L", (w, h), 0)
        odraw = ImageDraw.Draw(occ)
        ox = cx + rng.uniform(-1.0, 1.0) * radius
        oy = cy + rng.uniform(-1.0, 1.0) * radius
        orx, ory = rng.uniform(0.2, 0.5, size=2) * radius
        box = [ox - orx, oy - ory, ox + orx, oy + ory]
        colour = np.array(_random_colour(rng), dtype=np.float32)
        if rng.random() < 0.5:
            odraw.rectangle(box, fill=255)
        else:
            odraw.ellipse(box, fill=255)
        om = np.asarray(occ, dtype=np.float32)[..., None] * np.float32(1 / 255)
        img += om * (colour - img)

    # Lighting gradient, white balance, contrast/brightness, then sensor noise.
    lang = rng.uniform(0, 2 * math.pi)
    lk = rng.uniform(0.0, 0.5) / max(w, h)
    gain = 1.0 - 0.5 * lk * max(w, h) + xs * np.float32(lk * math.cos(lang))
    gain = gain + ys * np.float32(lk * math.sin(lang))
    contrast = rng.uniform(0.75, 1.2)
    balance = (rng.uniform(0.92, 1.08, size=3) * contrast).astype(np.float32)
    offset = np.float32(128.0 * (1.0 - contrast) + rng.uniform(-20, 20) + 0.5)  # +0.5: rounding
    img *= gain[..., None]
    img *= balance
    img += offset
    noise = rng.standard_normal((h, w, 3), dtype=np.float32)
    noise *= np.float32(rng.uniform(1.0, 5.0))
    img += noise
    np.clip(img, 0.0, 255.0, out=img)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def encode(img: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG bytes with an RNG-drawn quality, fixed settings and no metadata."""
    buf = io.BytesIO()
    quality = int(rng.integers(75, 91))
    img.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buf.getvalue()


def image_bytes(seed: int, class_index: int, image_id: int, min_side: int, max_side: int) -> bytes:
    """The JPEG file of image ``image_id`` of recipe ``class_index`` (pure function)."""
    rng = np.random.default_rng([seed, class_index, image_id])
    img = render(RECIPES[class_index], rng, min_side, max_side)
    return encode(img, rng)
