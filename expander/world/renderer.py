"""The portraits world: a procedural, vectorised renderer of cartoon portraits with ground truth.

Every image is drawn from a row of *source factors* (background hue, face shape, skin tone, hair
colour and style, eyes, brows, mouth, head position and tilt, shirt colour) and a row of *target
attribute* labels that never occur in the source domain (glasses, zombie, hat, sketch style, ...).
Shapes are signed-distance fields on a pixel grid, anti-aliased over one pixel and composited back
to front, all as batched tensor ops (no Python loop over images), so thousands of portraits render
per second on a CPU.

Conflicts between attributes, resolved in ``ATTRIBUTES`` order (the later one wins):
skin: ``zombie`` then ``blue_skin``; eyes: ``glasses``, ``sunglasses``, then ``eyepatch`` drawn on
top (all visible, the patch covers the right eye); whole-image styles apply in the order
``sketch``, ``pop_art``, ``pixel_art``.

Categorical factors (stored as float indices): ``hair_colour`` (black, brown, blonde, red, grey),
``hair_style`` (short, long, bun, buzz), ``eye_colour`` (brown, blue, green). All other factors are
continuous in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

ATTRIBUTES: tuple[str, ...] = (
    "glasses", "sunglasses", "zombie", "elf_ears", "beard", "moustache", "hat", "crown", "clown_nose",
    "cat_ears", "fangs", "eyepatch", "freckles", "blue_skin", "sketch", "pop_art", "pixel_art",
)
SOURCE_FACTORS: tuple[str, ...] = (
    "background_hue", "face_width", "face_height", "skin_tone", "hair_colour", "hair_style", "eye_size",
    "eye_spacing", "eye_colour", "brow_thickness", "brow_angle", "mouth_curve", "mouth_width",
    "head_x", "head_y", "tilt", "shirt_hue",
)
CATEGORICAL = {"hair_colour": 5, "hair_style": 4, "eye_colour": 3}
ATTRIBUTE_PHRASES: dict[str, tuple[str, ...]] = {
    "glasses": ("glasses", "spectacles", "eyeglasses"),
    "sunglasses": ("sunglasses", "dark shades", "shades"),
    "zombie": ("zombie", "undead", "walking dead"),
    "elf_ears": ("elf ears", "pointy ears", "pointed ears"),
    "beard": ("beard", "full beard", "bearded chin"),
    "moustache": ("moustache", "mustache", "whiskers above the lip"),
    "hat": ("hat", "brimmed hat", "top hat"),
    "crown": ("crown", "golden crown", "royal crown"),
    "clown_nose": ("clown nose", "red nose", "red ball nose"),
    "cat_ears": ("cat ears", "kitten ears", "feline ears"),
    "fangs": ("fangs", "vampire teeth", "vampire fangs"),
    "eyepatch": ("eyepatch", "pirate eyepatch", "eye patch"),
    "freckles": ("freckles", "freckled cheeks", "spotty cheeks"),
    "blue_skin": ("blue skin", "avatar skin", "blue face"),
    "sketch": ("sketch", "pencil drawing", "line drawing"),
    "pop_art": ("pop art", "warhol style", "comic colours"),
    "pixel_art": ("pixel art", "pixelated", "retro game sprite"),
}
# How each attribute enters a caption: "with X", "wearing X", "X" (a noun for the person) or a style.
_CAPTION_KIND = {
    "glasses": "wearing", "sunglasses": "wearing", "zombie": "noun", "elf_ears": "with", "beard": "with",
    "moustache": "with", "hat": "wearing", "crown": "wearing", "clown_nose": "with", "cat_ears": "with",
    "fangs": "with", "eyepatch": "wearing", "freckles": "with", "blue_skin": "with", "sketch": "style",
    "pop_art": "style", "pixel_art": "style",
}
_SOURCE_CAPTIONS = ("a portrait of a person", "a face", "a photo of a face", "a cartoon portrait", "a picture of a person")

_HAIR = torch.tensor([[0.10, 0.08, 0.07], [0.36, 0.21, 0.10], [0.86, 0.72, 0.42], [0.70, 0.27, 0.10], [0.62, 0.62, 0.64]])
_EYES = torch.tensor([[0.35, 0.20, 0.08], [0.20, 0.45, 0.80], [0.20, 0.55, 0.25]])
_SKIN_LIGHT = torch.tensor([0.98, 0.85, 0.72])
_SKIN_DARK = torch.tensor([0.45, 0.29, 0.18])
_ZOMBIE_SKIN = torch.tensor([0.52, 0.68, 0.42])
_BLUE_SKIN = torch.tensor([0.25, 0.50, 0.92])


@dataclass
class PortraitBatch:
    images: torch.Tensor  # (N, 3, R, R) float32 in [-1, 1]
    factors: torch.Tensor  # (N, F) float32
    labels: torch.Tensor  # (N, A) bool
    captions: list[str]


def _rng(generator: Union[torch.Generator, int]) -> torch.Generator:
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


def sample_factors(n: int, generator: Union[torch.Generator, int]) -> torch.Tensor:
    """Random source factors (N, F): continuous uniform in [0, 1], categorical as float indices."""
    rng = _rng(generator)
    factors = torch.rand(n, len(SOURCE_FACTORS), generator=rng)
    for name, count in CATEGORICAL.items():
        factors[:, SOURCE_FACTORS.index(name)] = torch.randint(count, (n,), generator=rng).float()
    return factors


def subject_factors(n_poses: int, generator: Union[torch.Generator, int]) -> torch.Tensor:
    """One identity (face, hair, colours fixed) in ``n_poses`` poses (position, tilt, mouth vary)."""
    rng = _rng(generator)
    identity = sample_factors(1, rng).repeat(n_poses, 1)
    varying = ["head_x", "head_y", "tilt", "mouth_curve", "background_hue"]
    for name in varying:
        identity[:, SOURCE_FACTORS.index(name)] = torch.rand(n_poses, generator=rng)
    return identity


def _hsv_to_rgb(h: torch.Tensor, s: float, v: float) -> torch.Tensor:
    """Hue (N,) in [0, 1] at fixed saturation/value -> RGB (N, 3)."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _cover(signed_distance: torch.Tensor, pixel: float) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance (negative inside), one pixel wide edge."""
    return torch.clamp(0.5 - signed_distance / pixel, 0.0, 1.0)


def _ellipse(x: torch.Tensor, y: torch.Tensor, cx, cy, rx, ry) -> torch.Tensor:
    """Approximate signed distance to an ellipse (good near the boundary, which is all AA needs)."""
    rx, ry = torch.as_tensor(rx), torch.as_tensor(ry)
    return (torch.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1) * torch.minimum(rx, ry)


def _box(x, y, cx, cy, hx, hy) -> torch.Tensor:
    dx, dy = (x - cx).abs() - hx, (y - cy).abs() - hy
    return torch.maximum(dx, dy).clamp(max=0) + torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)


def _triangle(x, y, ax, ay, bx, by, cx, cy) -> torch.Tensor:
    """Signed distance (negative inside) to a triangle: the max over its edges' half-plane distances."""
    ax, ay, bx, by, cx, cy = (torch.as_tensor(v, dtype=torch.float32) for v in (ax, ay, bx, by, cx, cy))
    orientation = torch.sign((bx - ax) * (cy - ay) - (by - ay) * (cx - ax))  # makes the interior negative

    def edge(px, py, qx, qy):
        nx, ny = qy - py, px - qx  # right-hand normal of p -> q
        return orientation * ((x - px) * nx + (y - py) * ny) / torch.sqrt(nx * nx + ny * ny)

    return torch.maximum(torch.maximum(edge(ax, ay, bx, by), edge(bx, by, cx, cy)), edge(cx, cy, ax, ay))


def _paint(canvas: torch.Tensor, coverage: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Composite a colour (N, 3) or (N, 3, H, W) over canvas (N, 3, H, W) with coverage (N, 1, H, W)."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    return canvas.lerp_(colour.expand_as(canvas), coverage)  # in place: one pass over memory


RENDER_CHUNK = 128  # images per pass: keeps the working set in cache, several times faster than one big pass


def render(factors: torch.Tensor, labels: Optional[torch.Tensor] = None, resolution: int = 64) -> torch.Tensor:
    """Deterministic rendering of (N, F) factors with (N, A) bool labels -> (N, 3, R, R) in [-1, 1]."""
    if labels is None:
        labels = torch.zeros(factors.shape[0], len(ATTRIBUTES), dtype=torch.bool)
    with torch.no_grad():
        return torch.cat([_render_chunk(f, l, resolution) for f, l in zip(factors.split(RENDER_CHUNK), labels.split(RENDER_CHUNK))])


def _render_chunk(factors: torch.Tensor, labels: torch.Tensor, resolution: int) -> torch.Tensor:
    n = factors.shape[0]
    f = {name: factors[:, i].view(n, 1, 1, 1) for i, name in enumerate(SOURCE_FACTORS)}
    pixel = 2.0 / resolution
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) * pixel - 1  # pixel centres in [-1, 1]
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    gx, gy = gx.view(1, 1, resolution, resolution), gy.view(1, 1, resolution, resolution)

    # Head frame: translate, then rotate by the tilt; face features are drawn in (x, y), in units
    # where the head is about 1.2 high (the image is 2 high).
    cx, cy = (f["head_x"] - 0.5) * 0.24, (f["head_y"] - 0.5) * 0.14 - 0.02
    angle = (f["tilt"] - 0.5) * math.radians(30)
    cos, sin = torch.cos(angle), torch.sin(angle)
    scale = 1.0 / 1.3  # face features below were laid out for a smaller head; this enlarges the portrait
    x = (cos * (gx - cx) + sin * (gy - cy)) * scale
    y = (-sin * (gx - cx) + cos * (gy - cy)) * scale
    px = pixel * scale  # one pixel, in face units
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * factors[:, SOURCE_FACTORS.index("skin_tone"), None]  # (N, 3)
    skin = skin + (_ZOMBIE_SKIN - skin) * labels[:, ATTRIBUTES.index("zombie"), None].float()
    skin = skin + (_BLUE_SKIN - skin) * labels[:, ATTRIBUTES.index("blue_skin"), None].float()
    g = {  # per-image drawing parameters; every value has the batch as its first dimension
        "x": x, "y": y,
        "head_rx": (0.34 + 0.10 * f["face_width"]).expand(n, 1, 1, 1), "head_ry": (0.42 + 0.08 * f["face_height"]).expand(n, 1, 1, 1),
        "skin": skin, "hair": _HAIR[factors[:, SOURCE_FACTORS.index("hair_colour")].long()],
        "eye_dx": 0.13 + 0.08 * f["eye_spacing"], "eye_r": 0.055 + 0.035 * f["eye_size"],
        "style": f["hair_style"], "f": f,
    }

    # Background: a pastel hue with a soft vertical gradient; shirt and neck are not tilted.
    background = _hsv_to_rgb(factors[:, SOURCE_FACTORS.index("background_hue")], 0.35, 0.95)[:, :, None, None]
    canvas = (background * (1.0 - 0.12 * (gy + 1) / 2)).expand(n, 3, resolution, resolution).contiguous()
    shirt = _hsv_to_rgb(factors[:, SOURCE_FACTORS.index("shirt_hue")], 0.6, 0.7)
    canvas = _paint(canvas, _cover(_ellipse(gx, gy, cx, 1.18, 0.70, 0.40), pixel), shirt)
    canvas = _paint(canvas, _cover(_box(x, y, 0, g["head_ry"] * 0.95, 0.11, 0.18), px), skin * 0.9)

    layers = [
        (None, _draw_long_hair), (None, _draw_ears), ("elf_ears", _draw_elf_ears), ("cat_ears", _draw_cat_ears),
        (None, _draw_face), ("zombie", _draw_eye_sockets), (None, _draw_eyes), (None, _draw_nose),
        ("beard", _draw_beard), ("moustache", _draw_moustache), (None, _draw_mouth), ("fangs", _draw_fangs),
        ("freckles", _draw_freckles), ("clown_nose", _draw_clown_nose), ("glasses", _draw_glasses),
        ("sunglasses", _draw_sunglasses), ("eyepatch", _draw_eyepatch), ("hat", _draw_hat), ("crown", _draw_crown),
    ]
    for attribute, draw in layers:
        if attribute is None:
            canvas = draw(canvas, g, px)
            continue
        # Attribute layers are drawn only on the images that carry them (most images carry none).
        index = labels[:, ATTRIBUTES.index(attribute)].nonzero().squeeze(1)
        if len(index):
            sub = {k: ({kk: vv[index] for kk, vv in v.items()} if isinstance(v, dict) else v[index]) for k, v in g.items()}
            canvas[index] = draw(canvas[index], sub, px)
    has = {name: labels[:, i].float().view(n, 1, 1, 1) for i, name in enumerate(ATTRIBUTES)}
    return _styles(canvas.clamp(0, 1), has, labels) * 2 - 1


def _solid(reference: torch.Tensor, rgb: Sequence[float]) -> torch.Tensor:
    return torch.tensor([rgb], dtype=torch.float32).expand(reference.shape[0], 3)


def _draw_long_hair(canvas, g, px):
    is_long = (g["style"] == 1).float()
    hair = torch.minimum(_box(g["x"], g["y"], 0, 0.14, g["head_rx"] + 0.07, 0.40), _ellipse(g["x"], g["y"], 0, -0.04, g["head_rx"] + 0.07, g["head_ry"] + 0.06))
    return _paint(canvas, is_long * _cover(hair, px), g["hair"])


def _draw_ears(canvas, g, px):
    for side in (-1.0, 1.0):
        canvas = _paint(canvas, _cover(_ellipse(g["x"], g["y"], side * g["head_rx"], 0.02, 0.07, 0.10), px), g["skin"] * 0.95)
    return canvas


def _draw_elf_ears(canvas, g, px):
    for side in (-1.0, 1.0):
        rx = g["head_rx"]
        tip = _triangle(g["x"], g["y"], side * (rx - 0.04), -0.06, side * (rx - 0.04), 0.12, side * (rx + 0.30), -0.26)
        canvas = _paint(canvas, _cover(tip, px), g["skin"] * 0.95)
    return canvas


def _draw_cat_ears(canvas, g, px):
    ry = g["head_ry"]
    for side in (-1.0, 1.0):
        outer = _triangle(g["x"], g["y"], side * 0.06, -ry + 0.10, side * 0.34, -ry + 0.02, side * 0.28, -ry - 0.30)
        inner = _triangle(g["x"], g["y"], side * 0.12, -ry + 0.05, side * 0.28, -ry + 0.01, side * 0.25, -ry - 0.18)
        canvas = _paint(canvas, _cover(outer, px), g["hair"])
        canvas = _paint(canvas, _cover(inner, px), _solid(canvas, (0.95, 0.55, 0.65)))
    return canvas


def _draw_face(canvas, g, px):
    x, y, rx, ry = g["x"], g["y"], g["head_rx"], g["head_ry"]
    canvas = _paint(canvas, _cover(_ellipse(x, y, 0, 0, rx, ry), px), g["skin"])
    # Hair on top: a cap clipped to the upper head (thin for buzz cuts), and a bun on top.
    is_bun, is_buzz = (g["style"] == 2).float(), (g["style"] == 3).float()
    hairline = -ry * (0.30 + 0.25 * is_buzz)
    cap = torch.maximum(_ellipse(x, y, 0, -0.04, rx + 0.05, ry + 0.05), y - hairline)
    canvas = _paint(canvas, _cover(cap, px) * (1 - 0.55 * is_buzz), g["hair"])
    return _paint(canvas, is_bun * _cover(_ellipse(x, y, 0, -ry - 0.10, 0.16, 0.13), px), g["hair"])


_EYE_Y = -0.05


def _draw_eye_sockets(canvas, g, px):
    for side in (-1.0, 1.0):
        socket = _ellipse(g["x"], g["y"], side * g["eye_dx"], _EYE_Y, g["eye_r"] * 1.9, g["eye_r"] * 1.7)
        canvas = _paint(canvas, _cover(socket, px), _solid(canvas, (0.18, 0.22, 0.15)))
    return canvas


def _draw_eyes(canvas, g, px):
    x, y, f, r = g["x"], g["y"], g["f"], g["eye_r"]
    iris = _EYES[f["eye_colour"].view(-1).long()]
    for side in (-1.0, 1.0):
        ex = side * g["eye_dx"]
        canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 1.25, r), px), _solid(canvas, (0.98, 0.98, 0.98)))
        canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 0.65, r * 0.65), px), iris)
        canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 0.3, r * 0.3), px), _solid(canvas, (0, 0, 0)))
        slope = (f["brow_angle"] - 0.5) * 0.5 * side
        brow_y = _EYE_Y - r - 0.06 + slope * (x - ex)
        brow = torch.maximum((y - brow_y).abs() - (0.012 + 0.022 * f["brow_thickness"]), (x - ex).abs() - 0.09)
        canvas = _paint(canvas, _cover(brow, px), g["hair"] * 0.8)
    return canvas


def _draw_nose(canvas, g, px):
    return _paint(canvas, _cover(_ellipse(g["x"], g["y"], 0, 0.10, 0.035, 0.05), px), g["skin"] * 0.85)


def _draw_beard(canvas, g, px):
    beard = torch.maximum(_ellipse(g["x"], g["y"], 0, 0, g["head_rx"] + 0.01, g["head_ry"] + 0.01), 0.15 - g["y"])
    return _paint(canvas, _cover(beard, px), _facial_hair(g))


def _draw_moustache(canvas, g, px):
    return _paint(canvas, _cover(_ellipse(g["x"], g["y"], 0, 0.19, 0.15, 0.04), px), _facial_hair(g) * 0.8)


def _facial_hair(g) -> torch.Tensor:
    """Darker than the head hair, so beards stay visible on every skin tone."""
    return 0.45 * g["hair"] + 0.55 * torch.tensor([0.10, 0.07, 0.05])


_MOUTH_Y = 0.26


def _draw_mouth(canvas, g, px):
    x, y, f = g["x"], g["y"], g["f"]
    width = 0.08 + 0.07 * f["mouth_width"]
    curve = (f["mouth_curve"] - 0.5) * 6.0  # frown .. smile
    band = (y - (_MOUTH_Y + curve * (x**2 - width**2 / 2))).abs() - 0.018
    return _paint(canvas, _cover(torch.maximum(band, x.abs() - width), px), _solid(canvas, (0.55, 0.12, 0.15)))


def _draw_fangs(canvas, g, px):
    for side in (-1.0, 1.0):
        fang = _triangle(g["x"], g["y"], side * 0.05, _MOUTH_Y - 0.01, side * 0.10, _MOUTH_Y - 0.01, side * 0.075, _MOUTH_Y + 0.09)
        canvas = _paint(canvas, _cover(fang, px), _solid(canvas, (1, 1, 1)))
    return canvas


def _draw_freckles(canvas, g, px):
    for dx, dy in ((0.16, 0.10), (0.21, 0.13), (0.18, 0.16), (0.24, 0.08), (0.13, 0.14)):
        for side in (-1.0, 1.0):
            canvas = _paint(canvas, _cover(_ellipse(g["x"], g["y"], side * dx, dy, 0.017, 0.017), px), g["skin"] * 0.55)
    return canvas


def _draw_clown_nose(canvas, g, px):
    return _paint(canvas, _cover(_ellipse(g["x"], g["y"], 0, 0.10, 0.075, 0.075), px), _solid(canvas, (0.92, 0.08, 0.08)))


def _draw_glasses(canvas, g, px):
    ring_r = g["eye_r"] * 1.9
    for side in (-1.0, 1.0):
        ring = _ellipse(g["x"], g["y"], side * g["eye_dx"], _EYE_Y, ring_r, ring_r).abs() - 0.018
        canvas = _paint(canvas, _cover(ring, px), _solid(canvas, (0.12, 0.12, 0.15)))
    return _paint(canvas, _cover(_box(g["x"], g["y"], 0, _EYE_Y, g["eye_dx"] - ring_r + 0.01, 0.012), px), _solid(canvas, (0.1, 0.1, 0.12)))


def _draw_sunglasses(canvas, g, px):
    ring_r = g["eye_r"] * 1.9
    for side in (-1.0, 1.0):
        lens = _ellipse(g["x"], g["y"], side * g["eye_dx"], _EYE_Y, ring_r * 1.05, ring_r * 0.9)
        canvas = _paint(canvas, _cover(lens, px), _solid(canvas, (0.05, 0.05, 0.07)))
    return _paint(canvas, _cover(_box(g["x"], g["y"], 0, _EYE_Y, g["eye_dx"] - ring_r + 0.01, 0.012), px), _solid(canvas, (0.1, 0.1, 0.12)))


def _draw_eyepatch(canvas, g, px):
    x, y = g["x"], g["y"]
    strap = torch.maximum((y - (_EYE_Y - 0.9 * x)).abs() - 0.015, _ellipse(x, y, 0, 0, g["head_rx"], g["head_ry"]))
    canvas = _paint(canvas, _cover(strap, px), _solid(canvas, (0, 0, 0)))
    return _paint(canvas, _cover(_ellipse(x, y, g["eye_dx"], _EYE_Y, g["eye_r"] * 2.0, g["eye_r"] * 1.8), px), _solid(canvas, (0.03, 0.03, 0.03)))


def _draw_hat(canvas, g, px):
    x, y, rx, ry = g["x"], g["y"], g["head_rx"], g["head_ry"]
    brim = _ellipse(x, y, 0, -ry * 0.62, rx + 0.16, 0.06)
    top = _box(x, y, 0, -ry * 0.62 - 0.20, rx - 0.02, 0.20)
    canvas = _paint(canvas, _cover(torch.minimum(brim, top), px), _solid(canvas, (0.20, 0.16, 0.30)))
    return _paint(canvas, _cover(_box(x, y, 0, -ry * 0.62 - 0.06, rx - 0.02, 0.03), px), _solid(canvas, (0.8, 0.15, 0.15)))


def _draw_crown(canvas, g, px):
    x, y, rx = g["x"], g["y"], g["head_rx"]
    band_y = -g["head_ry"] * 0.78
    crown = _box(x, y, 0, band_y, rx * 0.8, 0.05)
    for spike_x in (-0.6, 0.0, 0.6):
        spike = _triangle(x, y, (spike_x - 0.22) * rx, band_y, (spike_x + 0.22) * rx, band_y, spike_x * rx, band_y - 0.22)
        crown = torch.minimum(crown, spike)
    return _paint(canvas, _cover(crown, px), _solid(canvas, (0.95, 0.78, 0.15)))


def _styles(canvas: torch.Tensor, has: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Whole-image styles, each blended in only where its label is set (in ATTRIBUTES order)."""
    if not labels[:, [ATTRIBUTES.index(a) for a in ("sketch", "pop_art", "pixel_art")]].any():
        return canvas
    luminance = (canvas * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    padded = F.pad(luminance, (1, 1, 1, 1), mode="replicate")
    edges = torch.sqrt(F.conv2d(padded, sobel_x) ** 2 + F.conv2d(padded, sobel_x.transpose(2, 3)) ** 2)
    sketch = (0.97 - 2.2 * edges).clamp(0.05, 1).expand_as(canvas)
    canvas = canvas + has["sketch"] * (sketch - canvas)

    # Pop art: push saturation, then posterise every channel to two levels.
    mean = canvas.mean(1, keepdim=True)
    saturated = (mean + 2.5 * (canvas - mean)).clamp(0, 1)
    pop = torch.where(saturated > 0.5, torch.tensor(0.98), torch.tensor(0.12))
    pop = pop * torch.tensor([1.0, 0.85, 0.95]).view(1, 3, 1, 1)
    canvas = canvas + has["pop_art"] * (pop - canvas)

    # Pixel art: 4x4-pixel blocks (at 64 px) with a quantised palette.
    side = canvas.shape[-1]
    blocks = F.interpolate(F.avg_pool2d(canvas, side // 16), size=side, mode="nearest")
    blocks = torch.round(blocks * 4) / 4
    return canvas + has["pixel_art"] * (blocks - canvas)


def _labels_from(attributes, n: int, rng: torch.Generator, attribute_prob: float) -> torch.Tensor:
    if attributes is None:
        labels = torch.rand(n, len(ATTRIBUTES), generator=rng) < attribute_prob if attribute_prob > 0 else torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
    elif torch.is_tensor(attributes):
        labels = attributes.bool().clone()
    else:
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; known: {list(ATTRIBUTES)}")
        labels = torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
        labels[:, [ATTRIBUTES.index(a) for a in attributes]] = True
    # zombie/blue_skin would both recolour the skin: keep the later one (blue_skin).
    both = labels[:, ATTRIBUTES.index("zombie")] & labels[:, ATTRIBUTES.index("blue_skin")]
    labels[both, ATTRIBUTES.index("zombie")] = False
    return labels


def caption(labels: torch.Tensor, generator: Union[torch.Generator, int]) -> list[str]:
    """One caption per row of labels, phrasing drawn at random from several forms."""
    rng = _rng(generator)
    # All random choices drawn at once (one call instead of several per caption): (N, 8) uniforms.
    draws = torch.rand(labels.shape[0], 8, generator=rng).tolist()
    captions = []
    for row, row_draws in zip(labels.bool().tolist(), draws):
        present = [a for a, on in zip(ATTRIBUTES, row) if on]
        stream = iter(row_draws * 4)
        pick = lambda options: options[int(next(stream) * len(options))]  # noqa: E731
        if not present:
            captions.append(pick(_SOURCE_CAPTIONS))
            continue
        styles = [a for a in present if _CAPTION_KIND[a] == "style"]
        nouns = [a for a in present if _CAPTION_KIND[a] == "noun"]
        extras = [a for a in present if _CAPTION_KIND[a] in ("with", "wearing")]
        subject = f"a {pick(ATTRIBUTE_PHRASES[nouns[0]])}" if nouns else pick(("a person", "a face", "a portrait of a person"))
        parts = [subject]
        if extras:
            phrases = [pick(ATTRIBUTE_PHRASES[a]) for a in extras]
            verb = "wearing" if all(_CAPTION_KIND[a] == "wearing" for a in extras) and next(stream) < 0.5 else "with"
            parts.append(f"{verb} {' and '.join(phrases)}")
        text = " ".join(parts)
        if styles:
            text = f"a {' '.join(pick(ATTRIBUTE_PHRASES[s]) for s in styles)} of {text}"
        captions.append(text)
    return captions


def sample_portraits(
    n: int,
    generator: Union[torch.Generator, int] = 0,
    attributes: Union[None, Sequence[str], torch.Tensor] = None,
    attribute_prob: float = 0.0,
    with_captions: bool = True,
    resolution: int = 64,
) -> PortraitBatch:
    """Random portraits: source domain by default, or with the given attributes / probability."""
    rng = _rng(generator)
    factors = sample_factors(n, rng)
    labels = _labels_from(attributes, n, rng, attribute_prob)
    images = render(factors, labels, resolution)
    captions = caption(labels, rng) if with_captions else []
    return PortraitBatch(images, factors, labels, captions)


if __name__ == "__main__":  # pragma: no cover - preview: python -m expander.world.renderer OUT_PREFIX
    import sys
    import time

    from ..utils.images import save_grid

    prefix = sys.argv[1] if len(sys.argv) > 1 else "/tmp/renderer"
    torch.set_num_threads(2)
    sample_portraits(256, 1)  # warm-up: the first call pays for memory allocation
    start = time.perf_counter()
    batch = sample_portraits(2048, 0)
    print(f"{2048 / (time.perf_counter() - start):.0f} images/s (source domain, with captions)")
    start = time.perf_counter()
    sample_portraits(2048, 0, attribute_prob=0.15)
    print(f"{2048 / (time.perf_counter() - start):.0f} images/s (attribute_prob=0.15)")
    save_grid(batch.images[:64], f"{prefix}_source.png", nrow=8, upscale=2)
    rows = [sample_portraits(8, i, attributes=[a]).images for i, a in enumerate(ATTRIBUTES)]
    save_grid(torch.cat(rows), f"{prefix}_attributes.png", nrow=8, upscale=2)
