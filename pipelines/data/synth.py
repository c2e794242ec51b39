"""A procedural, class-conditional stand-in for ImageNet, in ImageNet's own layout.

Each class is a visually distinct family: a shape (disc, square, triangle, ring, cross,
stripes, checker, diamond), a hue and a background texture, all derived from the class
index; inside a class the position, size, rotation, shading and noise vary. The output is
a pure function of (classes, per_class, size, seed).

Layout, as ImageNet is distributed:
    train/<wnid>/<wnid>_<n>.JPEG
    val/ILSVRC2012_val_<8 digits>.JPEG  + LOC_val_solution.csv  (flat val, labels in the CSV)
    LOC_synset_mapping.txt              (wnid and a name per line, in label order)

With `quirks`, the train split also holds what real ImageNet and object stores contain:
a CMYK JPEG, a grayscale JPEG, a PNG named `.JPEG`, an RGBA PNG, a palette GIF named
`.JPEG`, a truncated JPEG and a zero-byte file. `_quirks.json` lists them by key.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "ring", "cross", "stripes", "checker", "diamond")
QUIRK_KINDS = ("cmyk", "grayscale", "png_named_jpeg", "rgba_png", "palette_gif", "truncated", "empty")
UNREADABLE_QUIRKS = ("truncated", "empty")


def wnid(label: int) -> str:
    """A WordNet-style id for a synthetic class: 'n' and eight digits, sorted like the labels."""
    return f"n{10_000_000 + 7919 * label:08d}"


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    hue: float
    background_hue: float
    texture: int  # 0 flat, 1 noise, 2 gradient, 3 dots


def class_style(label: int) -> ClassStyle:
    """The family of a class: shape cycles fastest, hue next, so neighbours differ in both."""
    golden = 0.6180339887
    return ClassStyle(
        shape=SHAPES[label % len(SHAPES)],
        hue=(label * golden) % 1.0,
        background_hue=(label * golden + 0.5) % 1.0,
        texture=(label // len(SHAPES)) % 4,
    )


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(r * 255), int(g * 255), int(b * 255)


def render(label: int, index: int, size: int, seed: int) -> Image.Image:
    """One RGB image of class `label`; deterministic in (label, index, size, seed)."""
    style = class_style(label)
    rng = np.random.default_rng([seed, label, index])
    # Background: the class's texture in its background hue.
    bg = np.array(_rgb(style.background_hue, 0.35, 0.55 + 0.2 * rng.random()), np.float32)
    canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if style.texture == 1:
        canvas += rng.normal(0, 18, (size, size, 1))
    elif style.texture == 2:
        canvas *= (0.6 + 0.6 * (xx if rng.random() < 0.5 else yy))[..., None]
    elif style.texture == 3:
        period = max(size // 8, 2)
        canvas += 40 * (((xx * size) % period < period / 3) & ((yy * size) % period < period / 3))[..., None]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))

    # Foreground: the class's shape, jittered in place, scale, angle and shade.
    draw = ImageDraw.Draw(img)
    color = _rgb(style.hue + rng.normal(0, 0.02), 0.85, 0.75 + 0.25 * rng.random())
    r = size * (0.22 + 0.12 * rng.random())
    cx, cy = size * (0.5 + 0.15 * rng.uniform(-1, 1)), size * (0.5 + 0.15 * rng.uniform(-1, 1))
    angle = rng.uniform(0, math.pi)

    def rotated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if style.shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif style.shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(int(r / 3), 1))
    elif style.shape == "square":
        draw.polygon(rotated([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=color)
    elif style.shape == "diamond":
        draw.polygon(rotated([(0, -r * 1.3), (r * 0.8, 0), (0, r * 1.3), (-r * 0.8, 0)]), fill=color)
    elif style.shape == "triangle":
        draw.polygon(rotated([(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]), fill=color)
    elif style.shape == "cross":
        w = r / 3
        draw.polygon(rotated([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=color)
        draw.polygon(rotated([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=color)
    elif style.shape == "stripes":
        step = max(int(r / 2), 2)
        for k in range(-size, 2 * size, 2 * step):
            draw.line(rotated([(k - cx, -size), (k - cx, size)]), fill=color, width=step)
    elif style.shape == "checker":
        step = max(int(r / 2), 2)
        for i in range(0, size, step):
            for j in range(0, size, step):
                if ((i // step) + (j // step)) % 2 == 0 and abs(i - cx) < r * 1.2 and abs(j - cy) < r * 1.2:
                    draw.rectangle([i, j, i + step - 1, j + step - 1], fill=color)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=0.5 + rng.random()))
    return img


def _jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _quirk_bytes(kind: str, img: Image.Image) -> bytes:
    buf = io.BytesIO()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=92)
    elif kind == "grayscale":
        img.convert("L").save(buf, format="JPEG", quality=92)
    elif kind == "png_named_jpeg":
        img.save(buf, format="PNG")
    elif kind == "rgba_png":
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(buf, format="PNG")
    elif kind == "palette_gif":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, format="GIF")
    elif kind == "truncated":
        data = _jpeg(img)
        return data[: len(data) // 3]
    elif kind == "empty":
        return b""
    else:
        raise ValueError(f"unknown quirk {kind!r}; choose from {QUIRK_KINDS}")
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class SynthSummary:
    root: str
    classes: int
    train_images: int
    val_images: int
    quirks: dict[str, str]
    test_images: int = 0


def make_synthetic_imagenet(
    out: str,
    classes: int = 10,
    per_class: int = 20,
    size: int = 64,
    seed: int = 0,
    val_per_class: int = 2,
    quirks: bool = False,
    test_per_class: int = 0,
) -> SynthSummary:
    """Write the dataset under the local folder `out` (created if missing) and return counts.

    `val_per_class` images of each class go to a flat val/ with LOC_val_solution.csv (as ImageNet
    ships it), `test_per_class` to test/<wnid>/ folders; both are draws nothing trains on."""
    if classes < 1 or per_class < 1 or size < 8 or val_per_class < 0 or test_per_class < 0:
        raise ValueError(
            f"need classes >= 1, per_class >= 1, size >= 8, val_per_class >= 0, test_per_class >= 0; "
            f"got classes={classes}, per_class={per_class}, size={size}, val_per_class={val_per_class}, "
            f"test_per_class={test_per_class}"
        )
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    os.makedirs(os.path.join(out, "val"), exist_ok=True)
    names = []
    for label in range(classes):
        style = class_style(label)
        names.append(f"{wnid(label)} synthetic {style.shape} hue{int(style.hue * 360):03d}")
        folder = os.path.join(out, "train", wnid(label))
        os.makedirs(folder, exist_ok=True)
        for n in range(per_class):
            _write(os.path.join(folder, f"{wnid(label)}_{n}.JPEG"), _jpeg(render(label, n, size, seed)))

    solution = ["ImageId,PredictionString"]
    val_index = 0
    for label in range(classes):
        for n in range(val_per_class):
            val_index += 1
            image_id = f"ILSVRC2012_val_{val_index:08d}"
            img = render(label, 1_000_000 + n, size, seed)
            _write(os.path.join(out, "val", f"{image_id}.JPEG"), _jpeg(img))
            solution.append(f"{image_id},{wnid(label)} 0 0 {size - 1} {size - 1}")

    for label in range(classes):
        if test_per_class:
            folder = os.path.join(out, "test", wnid(label))
            os.makedirs(folder, exist_ok=True)
        for n in range(test_per_class):
            _write(os.path.join(folder, f"{wnid(label)}_test_{n}.JPEG"), _jpeg(render(label, 2_000_000 + n, size, seed)))

    quirk_files: dict[str, str] = {}
    if quirks:
        for i, kind in enumerate(QUIRK_KINDS):
            label = i % classes
            key = f"train/{wnid(label)}/{wnid(label)}_quirk_{kind}.JPEG"
            _write(os.path.join(out, key), _quirk_bytes(kind, render(label, 500_000 + i, size, seed)))
            quirk_files[key] = kind
        _write(os.path.join(out, "_quirks.json"), json.dumps(quirk_files, indent=2, sort_keys=True).encode())

    _write(os.path.join(out, "LOC_val_solution.csv"), ("\n".join(solution) + "\n").encode())
    _write(os.path.join(out, "LOC_synset_mapping.txt"), ("\n".join(names) + "\n").encode())
    return SynthSummary(out, classes, classes * per_class + len(quirk_files), val_index, quirk_files,
                        classes * test_per_class)
