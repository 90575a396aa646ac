"""Image tensors <-> files: grids for the CLI and model cards, and reading a user's image folder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, upscale: int = 1) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one PIL image, ``nrow`` images per row."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pixels = to_uint8(images)
    canvas = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        canvas[y : y + h, x : x + w] = pixels[i]
    image = Image.fromarray(canvas)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, path: str | Path, nrow: Optional[int] = None, upscale: Optional[int] = None) -> Path:
    """Save a grid; small images (<= 64 px) are upscaled so they are visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if upscale is None:
        upscale = max(1, 128 // images.shape[-1])
    make_grid(images, nrow=nrow, upscale=upscale).save(path)
    return path


def image_files(folder: str | Path, purpose: str = "add a few photos of the subject") -> list[Path]:
    """The image files of ``folder``, sorted; a clear error for a missing or empty folder (``purpose``: what to add)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); {purpose}")
    return files


def load_image(file: Path, resolution: int) -> torch.Tensor:
    """One image file as (3, R, R) in [-1, 1]: centre-cropped to square, resized with antialiasing."""
    try:
        with Image.open(file) as image:
            image = image.convert("RGB")
    except Exception as err:
        raise ValueError(f"cannot read image {file}: {err}; remove or replace it") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, S, S)
    return F.interpolate(array[None], size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)[0]


def load_image_folder(folder: str | Path, resolution: int) -> torch.Tensor:
    """Every image in ``folder`` as (N, 3, R, R) in [-1, 1] (centre-cropped to square, resized).

    Raises a clear error for a missing or empty folder and names any unreadable file.
    """
    return torch.stack([load_image(file, resolution) for file in image_files(folder)])


class ImageFolderSampler:
    """Random batches of a folder of real photos, read from disk per batch (a folder of thousands of
    1024 px photos would not fit in memory): the real images of the GAN loss for real models.

    Every file's header is checked on construction, so a folder with an unreadable file fails before
    any training, naming the file.
    """

    def __init__(self, folder: str | Path, resolution: int):
        self.folder, self.resolution = Path(folder), resolution
        self.files = image_files(folder, purpose="add photos of the model's own domain (e.g. faces for an FFHQ model) for the GAN loss")
        for file in self.files:
            try:
                with Image.open(file) as image:
                    image.verify()  # the header and structure, without decoding the pixels
            except Exception as err:
                raise ValueError(f"cannot read image {file}: {err}; remove or replace it") from None

    def __len__(self) -> int:
        return len(self.files)

    def __call__(self, n: int, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, 3, R, R) in [-1, 1], files drawn uniformly with replacement from ``rng``."""
        picks = torch.randint(len(self.files), (n,), generator=rng)
        return torch.stack([load_image(self.files[int(i)], self.resolution) for i in picks])
