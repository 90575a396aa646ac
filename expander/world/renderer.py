"""The portraits world: a procedural, vectorised renderer of cartoon portraits with ground truth.

Every image is drawn from a row of *source factors* (background hue, face shape, skin tone, hair
colour and style, eyes, brows, mouth, head position and tilt, shirt colour) and a row of *target
attribute* labels that never occur in the source domain (glasses, zombie, hat, sketch style, ...).
Shapes are signed-distance fields on a pixel grid, anti-aliased over one pixel and composited back
to front, all as batched tensor ops (no Python loop over images), so thousands of portraits render
per second on a CPU.

Conflicts between attributes (``CONFLICTS``, applied by ``resolve_conflicts``, by ``render`` and
by ``sample_portraits``, whose returned labels are the resolved ones): ``zombie`` + ``blue_skin``
keeps ``blue_skin`` and ``glasses`` + ``sunglasses`` keeps ``sunglasses`` (the later in
``ATTRIBUTES`` wins). Every other combination stays visible: ``eyepatch`` is drawn over the right
eye on top of either kind of glasses, ``cat_ears`` are drawn over a ``hat`` (which would otherwise
hide them), a ``crown`` sits over a ``hat``, and the whole-image styles apply in the order
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


WORLD_SUBJECT_PREFIX = "world:subject:"  # image source of a world MyStyle domain: world:subject:SEED


def world_subject_seed(source: Optional[str]) -> Optional[int]:
    """SEED of a ``world:subject:SEED`` image source, ``None`` for anything else (a folder)."""
    if not source or not source.startswith(WORLD_SUBJECT_PREFIX):
        return None
    text = source[len(WORLD_SUBJECT_PREFIX):]
    if not text.isdigit():
        raise ValueError(f"invalid world subject {source!r}: use {WORLD_SUBJECT_PREFIX}SEED with an integer SEED, e.g. {WORLD_SUBJECT_PREFIX}7")
    return int(text)


def subject_photos(seed: int, n_poses: int = 10, resolution: int = 64) -> torch.Tensor:
    """The "photos" of world subject ``seed``: one identity rendered in ``n_poses`` poses, (N, 3, R, R)."""
    return render(subject_factors(n_poses, torch.Generator().manual_seed(seed)), resolution=resolution)


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
    _check_labels(labels, factors.shape[0])
    labels = resolve_conflicts(labels)
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
    cx, cy = (f["head_x"] - 0.5) * 0.24, (f["head_y"] - 0.5) * 0.14 - 0.02  # (N, 1, 1, 1) each
    angle = (f["tilt"] - 0.5) * math.radians(30)
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = (cos * (gx - cx) + sin * (gy - cy)) * _FACE_SCALE  # (N, 1, R, R)
    y = (-sin * (gx - cx) + cos * (gy - cy)) * _FACE_SCALE
    px = pixel * _FACE_SCALE  # one pixel, in face units
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * factors[:, SOURCE_FACTORS.index("skin_tone"), None]  # (N, 3)
    skin = skin + (_ZOMBIE_SKIN - skin) * labels[:, ATTRIBUTES.index("zombie"), None].float()
    skin = skin + (_BLUE_SKIN - skin) * labels[:, ATTRIBUTES.index("blue_skin"), None].float()
    g = {  # per-image drawing parameters; every value has the batch as its first dimension
        "x": x, "y": y,
        "head_rx": (0.34 + 0.10 * f["face_width"]).expand(n, 1, 1, 1), "head_ry": (0.42 + 0.08 * f["face_height"]).expand(n, 1, 1, 1),
        "skin": skin, "hair": _HAIR[factors[:, SOURCE_FACTORS.index("hair_colour")].long()],
        "eye_dx": 0.13 + 0.08 * f["eye_spacing"], "eye_r": 0.055 + 0.035 * f["eye_size"],
        "style": f["hair_style"], "f": f,
        "cx": cx, "cy": cy, "cos": cos, "sin": sin,  # the head frame, to find the pixels a feature can touch
    }

    # Background: a pastel hue with a soft vertical gradient; shirt and neck are not tilted.
    background = _hsv_to_rgb(factors[:, SOURCE_FACTORS.index("background_hue")], 0.35, 0.95)[:, :, None, None]
    canvas = (background * (1.0 - 0.12 * (gy + 1) / 2)).expand(n, 3, resolution, resolution).contiguous()
    shirt = _hsv_to_rgb(factors[:, SOURCE_FACTORS.index("shirt_hue")], 0.6, 0.7)
    shirt_rows = slice(max(0, int((1 + _SHIRT_TOP) / pixel) - 2), resolution)  # the shirt only reaches the bottom rows
    _paint(canvas[:, :, shirt_rows], _cover(_ellipse(gx[..., shirt_rows, :], gy[..., shirt_rows, :], cx, 1.18, 0.70, 0.40), pixel), shirt)

    for when, draw, box in _LAYERS:
        if when is None:
            _draw_layer(draw, canvas, g, px, box)
            continue
        # Conditional layers are drawn only on the images that need them (most images carry no attribute).
        if callable(when):
            chosen = when(g)
        else:
            required = [ATTRIBUTES.index(a) for a in ((when,) if isinstance(when, str) else when)]
            chosen = labels[:, required].all(1)
        index = chosen.nonzero().squeeze(1)
        if len(index):
            _draw_layer(draw, canvas, g, px, box, index)
    return _styles(canvas.clamp(0, 1), labels) * 2 - 1


_FACE_SCALE = 1.0 / 1.3  # face units per image unit: the features were laid out for a smaller head; this enlarges the portrait
_SHIRT_TOP = 0.78  # image units: top of the shirt ellipse (centre 1.18, half-height 0.40)
USE_WINDOWS = True  # draw small features only inside the rows/columns they can reach; False draws every layer on the full grid (tests compare both)


def _window(g: dict, box: tuple[float, float, float], resolution: int) -> tuple[slice, slice]:
    """Rows and columns, shared by the batch, that hold the face-space box |x| <= w, top <= y <= bottom.

    The box is mapped to the image through every image's head frame (its four corners bound the
    rotated box), then widened by two pixels for the anti-aliased fringe.
    """
    half_width, top, bottom = box
    corner_x = torch.tensor([-half_width, half_width, -half_width, half_width])  # (4,)
    corner_y = torch.tensor([top, top, bottom, bottom])
    cos, sin = g["cos"].view(-1, 1), g["sin"].view(-1, 1)  # (N, 1)
    image_x = g["cx"].view(-1, 1) + (cos * corner_x - sin * corner_y) / _FACE_SCALE  # (N, 4): inverse of the head frame
    image_y = g["cy"].view(-1, 1) + (sin * corner_x + cos * corner_y) / _FACE_SCALE
    pixel = 2.0 / resolution

    def span(low: torch.Tensor, high: torch.Tensor) -> slice:
        first = max(0, math.floor((low.item() + 1) / pixel) - 2)
        return slice(first, max(first, min(resolution, math.ceil((high.item() + 1) / pixel) + 2)))

    return span(image_y.min(), image_y.max()), span(image_x.min(), image_x.max())


def _draw_layer(draw, canvas: torch.Tensor, g: dict, px: float, box: Optional[tuple[float, float, float]], index: Optional[torch.Tensor] = None) -> None:
    """Paint one layer into canvas (N, 3, R, R), in place: on the images in ``index`` (None: all),
    and only inside the window of its face-space box (None: the full grid).

    Pixels outside the window get zero coverage anyway, so the result is identical to drawing on
    the full grid (tests check it) at a fraction of the cost for small features such as eyes; the
    window is cut before the images are gathered, so attribute layers copy only their window.
    """
    if index is not None:  # the per-image parameters of the chosen images (small tensors)
        g = {
            k: v if k in ("x", "y") else ({kk: vv[index] for kk, vv in v.items()} if isinstance(v, dict) else v[index])
            for k, v in g.items()
        }
    rows, cols = _window(g, box, canvas.shape[-1]) if box is not None and USE_WINDOWS else (slice(None), slice(None))
    x, y, target = g["x"][:, :, rows, cols], g["y"][:, :, rows, cols], canvas[:, :, rows, cols]  # views
    if index is not None:
        x, y, target = x[index], y[index], target[index]  # gathered copies of the window only
    drawn = draw(target, dict(g, x=x, y=y), px)
    if index is not None:
        canvas[:, :, rows, cols][index] = drawn  # index_put_ through the view writes into canvas
    elif drawn.data_ptr() != target.data_ptr():  # a layer that did not paint in place
        target.copy_(drawn)


def _solid(reference: torch.Tensor, rgb: Sequence[float]) -> torch.Tensor:
    return torch.tensor([rgb], dtype=torch.float32).expand(reference.shape[0], 3)


def _draw_neck(canvas, g, px):
    return _paint(canvas, _cover(_box(g["x"], g["y"], 0, g["head_ry"] * 0.95, 0.11, 0.18), px), g["skin"] * 0.9)


def _draw_long_hair(canvas, g, px):  # only called for long hair (see _LAYERS)
    hair = torch.minimum(_box(g["x"], g["y"], 0, 0.14, g["head_rx"] + 0.07, 0.40), _ellipse(g["x"], g["y"], 0, -0.04, g["head_rx"] + 0.07, g["head_ry"] + 0.06))
    return _paint(canvas, _cover(hair, px), g["hair"])


def _draw_ears(canvas, g, px):
    # Both ears at once through |x|: the face is mirror-symmetric and the ears never reach x = 0.
    return _paint(canvas, _cover(_ellipse(g["x"].abs(), g["y"], g["head_rx"], 0.02, 0.07, 0.10), px), g["skin"] * 0.95)


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
    # Hair on top: a cap clipped to the upper head (thin for buzz cuts); buns follow in _draw_bun.
    is_buzz = (g["style"] == 3).float()
    hairline = -ry * (0.30 + 0.25 * is_buzz)
    cap = torch.maximum(_ellipse(x, y, 0, -0.04, rx + 0.05, ry + 0.05), y - hairline)
    return _paint(canvas, _cover(cap, px) * (1 - 0.55 * is_buzz), g["hair"])


def _draw_bun(canvas, g, px):  # only called for buns (see _LAYERS)
    return _paint(canvas, _cover(_ellipse(g["x"], g["y"], 0, -g["head_ry"] - 0.10, 0.16, 0.13), px), g["hair"])


_EYE_Y = -0.05


def _draw_eye_sockets(canvas, g, px):
    for side in (-1.0, 1.0):
        socket = _ellipse(g["x"], g["y"], side * g["eye_dx"], _EYE_Y, g["eye_r"] * 1.9, g["eye_r"] * 1.7)
        canvas = _paint(canvas, _cover(socket, px), _solid(canvas, (0.18, 0.22, 0.15)))
    return canvas


def _draw_eyes(canvas, g, px):
    # Both eyes at once through |x| (mirror-symmetric, brows included; eyes and brows stay clear
    # of x = 0 for every eye size and spacing), drawn as the right eye.
    x, y, f, r, ex = g["x"].abs(), g["y"], g["f"], g["eye_r"], g["eye_dx"]
    iris = _EYES[f["eye_colour"].view(-1).long()]
    canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 1.25, r), px), _solid(canvas, (0.98, 0.98, 0.98)))
    canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 0.65, r * 0.65), px), iris)
    canvas = _paint(canvas, _cover(_ellipse(x, y, ex, _EYE_Y, r * 0.3, r * 0.3), px), _solid(canvas, (0, 0, 0)))
    slope = (f["brow_angle"] - 0.5) * 0.5
    brow_y = _EYE_Y - r - 0.06 + slope * (x - ex)
    brow = torch.maximum((y - brow_y).abs() - (0.012 + 0.022 * f["brow_thickness"]), (x - ex).abs() - 0.09)
    return _paint(canvas, _cover(brow, px), g["hair"] * 0.8)


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
    # Dots about two pixels wide (smaller ones vanish at 64 px), mirrored onto both cheeks through
    # |x|, all unioned into one paint; a reddish brown darker than the skin on every tone.
    mirrored_x = g["x"].abs()
    dots = None
    for dx, dy in ((0.15, 0.10), (0.21, 0.12), (0.17, 0.17), (0.25, 0.07), (0.24, 0.18)):
        dot = _ellipse(mirrored_x, g["y"], dx, dy, 0.024, 0.024)
        dots = dot if dots is None else torch.minimum(dots, dot)
    return _paint(canvas, _cover(dots, px), g["skin"] * torch.tensor([0.62, 0.45, 0.35]))


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


# Back to front: (when, draw, box). ``when`` is None (every image), attribute name(s) that must all
# be present, or a function of the drawing parameters giving an (N,) bool mask. ``box`` is
# (half width, top, bottom) in face units and bounds everything the layer can paint for any factors
# (maxima: head_rx 0.44, head_ry 0.50, eye_dx 0.21, eye_r 0.09) with a margin; None draws on the
# full grid. A box too small would clip a shape: test_renderer checks that windowed and full-grid
# rendering agree exactly.
_LAYERS = (
    (None, _draw_neck, (0.16, 0.16, 0.72)),
    (lambda g: g["style"].view(-1) == 1, _draw_long_hair, None),  # hair styles: short, long, bun, buzz
    (None, _draw_ears, (0.56, -0.14, 0.18)),
    ("elf_ears", _draw_elf_ears, (0.80, -0.32, 0.18)),
    ("cat_ears", _draw_cat_ears, (0.40, -0.86, -0.24)),
    (None, _draw_face, (0.54, -0.64, 0.56)),
    (lambda g: g["style"].view(-1) == 2, _draw_bun, (0.22, -0.80, -0.34)),
    ("zombie", _draw_eye_sockets, (0.42, -0.26, 0.16)),
    (None, _draw_eyes, (0.37, -0.30, 0.09)),
    (None, _draw_nose, (0.08, 0.02, 0.18)),
    ("beard", _draw_beard, (0.50, 0.10, 0.56)),
    ("moustache", _draw_moustache, (0.26, 0.10, 0.28)),
    (None, _draw_mouth, (0.20, 0.17, 0.35)),
    ("fangs", _draw_fangs, (0.14, 0.21, 0.39)),
    ("freckles", _draw_freckles, (0.31, 0.02, 0.23)),
    ("clown_nose", _draw_clown_nose, (0.11, 0.00, 0.20)),
    ("glasses", _draw_glasses, (0.44, -0.28, 0.18)),
    ("sunglasses", _draw_sunglasses, (0.44, -0.28, 0.18)),
    ("eyepatch", _draw_eyepatch, (0.48, -0.52, 0.42)),
    ("hat", _draw_hat, (0.85, -0.80, -0.08)),
    ("crown", _draw_crown, (0.42, -0.68, -0.22)),
    (("cat_ears", "hat"), _draw_cat_ears, (0.40, -0.86, -0.24)),  # again, over the hat, which would hide them
)

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _styles(canvas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whole-image styles on (N, 3, R, R) in [0, 1], applied in ATTRIBUTES order where labelled.

    Each style processes only the images that carry it (styles cost several full-image passes).
    """
    for name, style in (("sketch", _sketch), ("pop_art", _pop_art), ("pixel_art", _pixel_art)):
        index = labels[:, ATTRIBUTES.index(name)].nonzero().squeeze(1)
        if len(index):
            canvas[index] = style(canvas[index])
    return canvas


def _outlines(canvas: torch.Tensor, luminance: torch.Tensor) -> torch.Tensor:
    """(M, 1, R, R) line strength in [0, 1]: one pixel on the darker side of every colour boundary.

    A 3x3 dilation minus the image gives thin lines, so small features such as eyes stay readable
    instead of merging into blobs (as gradient-magnitude edges do); the colour term draws outlines
    between equally bright regions (a face on a background of the same lightness).
    """
    darker_luma = F.max_pool2d(F.pad(luminance, (1, 1, 1, 1), mode="replicate"), 3, 1) - luminance
    darker_colour = (F.max_pool2d(F.pad(canvas, (1, 1, 1, 1), mode="replicate"), 3, 1) - canvas).amax(1, keepdim=True)
    return (3.0 * (darker_luma + 0.6 * darker_colour)).clamp(0, 1)


def _sketch(canvas: torch.Tensor) -> torch.Tensor:
    """Grey pencil drawing of (M, 3, R, R) in [0, 1]: outlines on white paper, plus a light tone
    that keeps dark areas (sunglasses, black hair) filled rather than outlined (else sunglasses
    would read as glasses)."""
    luminance = (canvas * _LUMA).sum(1, keepdim=True)  # (M, 1, R, R)
    lines = _outlines(canvas, luminance)
    return (0.96 - 0.9 * lines - 0.45 * (1 - luminance) ** 2).clamp(0, 1).expand_as(canvas)


def _pop_art(canvas: torch.Tensor) -> torch.Tensor:
    """Push saturation, posterise every channel to two levels (a flat, loud palette), and ink the
    outlines in black, comic style (posterising can give face and background the same colour)."""
    mean = canvas.mean(1, keepdim=True)
    saturated = (mean + 2.5 * (canvas - mean)).clamp(0, 1)
    pop = torch.where(saturated > 0.5, torch.tensor(0.98), torch.tensor(0.12))
    pop = pop * torch.tensor([1.0, 0.85, 0.95]).view(1, 3, 1, 1)
    lines = _outlines(canvas, (canvas * _LUMA).sum(1, keepdim=True))
    return pop * (1 - 0.9 * lines)


def _pixel_art(canvas: torch.Tensor) -> torch.Tensor:
    """Blocks of R/16 pixels (4x4 at 64 px), nearest-upsampled, with a palette quantised to quarters."""
    side = canvas.shape[-1]
    blocks = F.interpolate(F.avg_pool2d(canvas, max(1, side // 16)), size=side, mode="nearest")
    return torch.round(blocks * 4) / 4


def _check_labels(labels: torch.Tensor, n: int) -> None:
    """Labels must be one row of len(ATTRIBUTES) flags per portrait: a mismatch would silently drop portraits."""
    if tuple(labels.shape) != (n, len(ATTRIBUTES)):
        raise ValueError(f"labels must have shape ({n}, {len(ATTRIBUTES)}): one row of attribute flags per portrait, in ATTRIBUTES order; got {tuple(labels.shape)}")


def _labels_from(attributes, n: int, rng: torch.Generator, attribute_prob: float) -> torch.Tensor:
    if attributes is None:
        labels = torch.rand(n, len(ATTRIBUTES), generator=rng) < attribute_prob if attribute_prob > 0 else torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
    elif torch.is_tensor(attributes):
        labels = attributes.bool().clone()
        _check_labels(labels, n)
    else:
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attributes {unknown}; known: {list(ATTRIBUTES)}")
        labels = torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
        labels[:, [ATTRIBUTES.index(a) for a in attributes]] = True
    return resolve_conflicts(labels)


# Pairs that cannot both be seen: (loser, winner). The winner is the later one in ATTRIBUTES.
CONFLICTS: tuple[tuple[str, str], ...] = (("zombie", "blue_skin"), ("glasses", "sunglasses"))


def resolve_conflicts(labels: torch.Tensor) -> torch.Tensor:
    """(N, A) bool labels with every conflicting pair resolved (see CONFLICTS); a new tensor.

    zombie + blue_skin: both recolour the skin, blue_skin is kept. glasses + sunglasses: the dark
    lenses would hide the glasses' rims, sunglasses are kept. Everything else combines visibly.
    """
    labels = labels.bool().clone()
    for loser, winner in CONFLICTS:
        both = labels[:, ATTRIBUTES.index(loser)] & labels[:, ATTRIBUTES.index(winner)]
        labels[both, ATTRIBUTES.index(loser)] = False
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


def attribute_labels(n: int, attribute: str) -> torch.Tensor:
    """(N, A) bool labels with ``attribute`` on every row and nothing else."""
    labels = torch.zeros(n, len(ATTRIBUTES), dtype=torch.bool)
    labels[:, ATTRIBUTES.index(attribute)] = True
    return labels


def attribute_mask(without: torch.Tensor, with_attribute: torch.Tensor) -> torch.Tensor:
    """(N, 1, R, R) float mask of the pixels an attribute changes, from renders of the same factors
    without / with it (N, 3, R, R)."""
    return ((with_attribute - without).abs().sum(1, keepdim=True) > 0.05).float()


def move_attribute(without: torch.Tensor, with_attribute: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """An attribute drawn in the wrong place: the pixels it changes, moved and pasted over the image without it.

    without, with_attribute: (N, 3, R, R) renders of the same factors without / with the attribute;
    rows, cols: N pixel shifts (down, right; wrapping at the border). Returns the images (N, 3, R, R)
    and the share of pixels the attribute changes (N,). The evaluation classifier does not label such
    images with the attribute (``benchmarks/clip_shortcuts.py``), and a CLIP should not either.
    """
    mask = attribute_mask(without, with_attribute)  # (N, 1, R, R)
    shift = [(int(r), int(c)) for r, c in zip(rows, cols)]
    moved_mask = torch.stack([torch.roll(m, s, dims=(1, 2)) for m, s in zip(mask, shift)])  # (N, 1, R, R)
    moved = torch.stack([torch.roll(x, s, dims=(1, 2)) for x, s in zip(with_attribute, shift)])  # (N, 3, R, R)
    return without * (1 - moved_mask) + moved * moved_mask, mask.mean((1, 2, 3))


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
