"""Image tensors <-> files: grids for the CLI and model cards, and reading a user's image folder."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .io import atomic_path

logger = logging.getLogger(__name__)

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
    """Save a grid, atomically (a stopped run leaves no truncated image); small images (<= 64 px) are
    upscaled so they are visible."""
    if upscale is None:
        upscale = max(1, 128 // images.shape[-1])
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    with atomic_path(path) as tmp:  # same name in a folder beside it: the suffix still picks the format
        grid.save(tmp)
    return Path(path)


def save_image_folder(batches: Iterable[torch.Tensor], folder: str | Path, names: Sequence[str], progress: bool = True) -> Path:
    """Write batches of (B, 3, H, W) images in [-1, 1] as one PNG each, named ``names`` in order, into
    ``folder``. Nothing appears until every image is written: a new folder is assembled beside it and
    renamed into place; in an existing folder (which stays itself: its permissions, a mount, a shell
    inside it) the images are written to a hidden ``.partial-*`` folder inside it and moved in at the
    end, replacing files of the same names and keeping every other file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder; write the images to a new folder (or to an image file for a grid)")
    if not folder.exists():
        with atomic_path(folder) as staging:
            staging.mkdir()
            _write_pngs(batches, staging, names, progress, folder)
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        _write_pngs(batches, staging, names, progress, folder)
        for name in names:
            os.replace(staging / name, folder / name)  # same file system: renames
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_pngs(batches: Iterable[torch.Tensor], into: Path, names: Sequence[str], progress: bool, shown_as: Path) -> None:
    written = 0
    with tqdm(total=len(names), desc=f"writing {shown_as}", unit="img", disable=not progress) as bar:
        for batch in batches:
            if written + len(batch) > len(names):  # the caller's names and batches disagree: a bug, not a user error
                raise ValueError(f"more images than the {len(names)} names given")
            for pixels in to_uint8(batch):  # (H, W, 3) each
                Image.fromarray(pixels).save(into / names[written])
                written += 1
            bar.update(len(batch))
    if written != len(names):
        raise ValueError(f"{written} images for {len(names)} names")


def image_files(folder: str | Path, purpose: str = "add a few photos of the subject", recursive: bool = False) -> list[Path]:
    """The image files of ``folder`` (and its subfolders if ``recursive``), sorted; a clear error for a
    missing or empty folder (``purpose``: what to add)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not an image folder; pass the folder that holds the images")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); {purpose}")
    return files


class UnreadableImageError(ValueError):
    @classmethod
    def of(cls, file: Path, err: Exception) -> "UnreadableImageError":
        return cls(f"cannot read image {file}: {err}; remove or replace it")


def load_image(file: Path, resolution: int) -> torch.Tensor:
    """One image file as (3, R, R) in [-1, 1]: centre-cropped to square, resized with antialiasing."""
    try:
        with Image.open(file) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")  # phone photos: upright, as viewers show them
    except Exception as err:
        raise UnreadableImageError.of(file, err) from None
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
    """Random batches of a folder of real photos (subfolders included, as in FFHQ's layout), read from
    disk per batch (thousands of 1024 px photos would not fit in memory): the real images of the GAN
    loss for real models.

    Every file is opened on construction, so a folder with a file that is not an image fails before
    any training, naming it. Decoding every pixel of a large folder up front would take minutes, so a
    file whose data turns out corrupt when a batch decodes it is skipped with a warning (the next
    readable file in order is taken instead): a run is not lost hours in for one bad photo.
    """

    def __init__(self, folder: str | Path, resolution: int):
        self.folder, self.resolution = Path(folder), resolution
        self.files = image_files(folder, purpose="add photos of the model's own domain (e.g. faces for an FFHQ model) for the GAN loss", recursive=True)
        self.unreadable: set[Path] = set()  # found corrupt while decoding a batch
        for file in self.files:
            try:
                with Image.open(file) as image:
                    image.verify()  # the header and structure, without decoding the pixels
            except Exception as err:
                raise UnreadableImageError.of(file, err) from None

    def __len__(self) -> int:
        return len(self.files)

    def __call__(self, n: int, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """(n, 3, R, R) in [-1, 1], files drawn uniformly with replacement from ``rng``."""
        return torch.stack([self._readable_from(int(torch.randint(len(self.files), (), generator=rng))) for _ in range(n)])

    def _readable_from(self, index: int) -> torch.Tensor:
        """The photo at ``index``, or the first readable one after it (wrapping round). Skipping takes
        no random draw and the file list keeps its length, so a resumed run, which has to find the
        corrupt files again, draws the same photos as an uninterrupted one."""
        for offset in range(len(self.files)):
            file = self.files[(index + offset) % len(self.files)]
            if file in self.unreadable:
                continue
            try:
                return load_image(file, self.resolution)
            except UnreadableImageError as err:
                logger.warning("%s; it is left out of the GAN loss's real images from now on", err)
                self.unreadable.add(file)
        raise UnreadableImageError(f"no readable image is left in {self.folder}; replace the corrupt files")
