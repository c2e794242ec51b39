"""Ray Data CPU stages: read image bytes, decode to RGB, centre-crop as ADM does.

Batches are dicts of numpy arrays (Ray Data's "numpy" batch format). Columns:

    in   key (str), label (int)
    ReadImageBytes  -> + bytes (binary), error (str, "" when fine)
    DecodeImages    -> key, label, pixels (S, S, 3) uint8, error

A file that cannot be read or decoded (missing, truncated, empty, not an image) keeps its row
with zero pixels and the reason in `error`; the encoder passes such rows by and the shard
writer records them as rejected. One bad file never stops a run. A failure of the store itself
(credentials, bucket, endpoint, permission, throttling) is not the file's fault: it raises a
StorageError naming data.source, so the run stops with nothing recorded as consumed.

Pixels travel between stages as uint8 (4x smaller in the object store than float32); the
encoder maps them to [-1, 1] and makes the horizontal flip on its own device, with
`to_model_input` and `hflip` below.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from pipelines.core import storage
from pipelines.data.latents import ERROR, KEY, LABEL

BYTES, PIXELS = "bytes", "pixels"


class UnreadableImage(ValueError):
    """The bytes are not a decodable image; the message is the reason recorded."""


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion image_datasets.py), as DiT and MAR use it.

    Halve with a BOX filter while the short side is >= 2x the target (cheap anti-aliasing),
    resize the short side to the target with BICUBIC, then crop the centre square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: CMYK, L, LA, P (palette), RGBA, 16-bit and float grayscale."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: PIL's convert would clip at 255, so rescale to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")  # a palette with transparency must pass through RGBA
    # Alpha is dropped, not composited: the convention of ADM/DiT/MAR (`convert("RGB")`).
    return img.convert("RGB")


def decode_image(data: bytes, image_size: int, name: str = "the file") -> np.ndarray:
    """Bytes of any image file -> (S, S, 3) uint8; raises UnreadableImage with the reason.

    `name` (the source key) stands in the reason where PIL would name its in-memory buffer.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    buffer = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(buffer)
            img.load()  # decode now: a truncated file fails here, not later
            return center_crop_arr(to_rgb(img), image_size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for
        # truncated data, SyntaxError / ValueError for some malformed headers.
        raise UnreadableImage(f"{type(err).__name__}: {str(err).replace(repr(buffer), name)}") from None


class ReadImageBytes:
    """Read each row's file from the dataset root; a missing file becomes an `error`, a failing
    store a StorageError."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root, self.storage_options = root, storage_options
        with storage.field("data.source"):
            self.fs, root_path = storage.filesystem(root, storage_options)
        self.root_path = root_path.rstrip("/")

    def _problem(self, path: str, err: BaseException) -> str:
        """The reject reason of a file the store could not give, or raise when the store itself failed."""
        url = storage.protocol_url(self.fs, path)
        problem = storage.classify(err, url, self.storage_options)
        if isinstance(problem, storage.NotFound) or isinstance(err, IsADirectoryError):
            return f"read failed: {problem}"
        with storage.field("data.source"):
            raise problem or storage.StorageError(f"{storage.redact(url)}: {type(err).__name__}: {err}", url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [f"{self.root_path}/{k}" for k in batch[KEY]]
        # One call for the batch: s3fs fetches the objects concurrently.
        with storage.field("data.source"), storage.translate_errors(self.root, self.storage_options):
            got = self.fs.cat(paths, on_error="return") if paths else {}
        data, errors = [], []
        for p in paths:
            value = got.get(p, FileNotFoundError(p))
            if isinstance(value, BaseException):
                data.append(b"")
                errors.append(self._problem(p, value))
            else:
                data.append(value)
                errors.append("")
        return {KEY: batch[KEY], LABEL: batch[LABEL],
                BYTES: np.array(data, dtype=object), ERROR: np.array(errors, dtype=object)}


class DecodeImages:
    """Decode + ADM centre crop to `image_size`; unreadable files keep zero pixels and a reason."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[KEY])
        pixels = np.zeros((n, self.image_size, self.image_size, 3), np.uint8)
        errors = list(batch[ERROR]) if ERROR in batch else [""] * n
        for i, data in enumerate(batch[BYTES]):
            if errors[i]:
                continue
            try:
                pixels[i] = decode_image(bytes(data) if data is not None else b"", self.image_size, str(batch[KEY][i]))
            except UnreadableImage as err:
                errors[i] = str(err)
        return {KEY: batch[KEY], LABEL: np.asarray(batch[LABEL], np.int64), PIXELS: pixels,
                ERROR: np.array(errors, dtype=object)}


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [-1, 1], as ADM: x / 127.5 - 1."""
    return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of (B, C, H, W) images: the one augmentation (MAR caches both views)."""
    return images.flip(-1)


def read_and_decode(batch: dict[str, np.ndarray], *, root: str, image_size: int,
                    storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """ReadImageBytes then DecodeImages, as one task function (no state worth an actor)."""
    return DecodeImages(image_size)(ReadImageBytes(root, storage_options)(batch))
