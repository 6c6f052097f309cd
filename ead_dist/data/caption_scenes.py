"""A caption data set that can be built here: Fashion-MNIST items composed into scenes.

No image-caption set can be downloaded on this machine, so the image-text path is tested on
scenes built from real Fashion-MNIST items: each image holds 2 or 3 items on a dark canvas,
each in its own quadrant, tinted one of a few colours and drawn small or large, and its caption
is generated from that layout ("a small red sneaker at the top left and a large blue bag at the
bottom right"). Retrieving the right caption needs the colours, sizes and positions, not only
the classes. The shards are written in img2dataset's exact layout: ``00000.tar`` holding
``KEY.jpg``, ``KEY.txt`` and ``KEY.json`` per sample, keys of 9 digits (5 for the shard, 4 for
the position in it), and beside each shard its ``00000.parquet`` and ``00000_stats.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from PIL import Image

from .. import storage

ITEM_NAMES = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt",
              "sneaker", "bag", "ankle boot"]  # Fashion-MNIST's classes, as a caption says them
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40), "white": (235, 235, 235), "purple": (170, 60, 220)}
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]  # the canvas's quadrants
SIZES = {"small": 0.30, "large": 0.47}  # item side as a fraction of the canvas side
BACKGROUND = 24
SHARD_DIGITS = 5  # img2dataset's oom_shard_count
INDEX_DIGITS = 4


@dataclass(frozen=True)
class Item:
    kind: int  # Fashion-MNIST class
    colour: str
    position: int  # index into POSITIONS
    size: str


def describe(items: list[Item]) -> str:
    """The caption of a scene: its items in quadrant order, joined as a sentence."""
    parts = [f"a {item.size} {item.colour} {ITEM_NAMES[item.kind]} at the "
             f"{POSITIONS[item.position]}" for item in sorted(items, key=lambda i: i.position)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_layout(rng: np.random.Generator) -> list[Item]:
    count = int(rng.integers(2, 4))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    colours = list(COLOURS)
    return [Item(kind=int(rng.integers(len(ITEM_NAMES))),
                 colour=colours[int(rng.integers(len(colours)))],
                 position=int(p), size=list(SIZES)[int(rng.integers(len(SIZES)))])
            for p in positions]


def render(items: list[Item], pictures: list[np.ndarray], canvas: int,
           rng: np.random.Generator) -> np.ndarray:
    """uint8 [canvas, canvas, 3]: each item's greyscale picture tinted and placed in its
    quadrant, jittered by a few pixels."""
    image = np.full((canvas, canvas, 3), BACKGROUND, dtype=np.float32)
    half = canvas // 2
    for item, picture in zip(items, pictures):
        side = max(4, round(SIZES[item.size] * canvas))
        resized = np.asarray(Image.fromarray(picture).resize((side, side), Image.BILINEAR),
                             dtype=np.float32) / 255.0
        row, col = divmod(item.position, 2)
        slack = half - side
        top = row * half + int(rng.integers(0, slack + 1))
        left = col * half + int(rng.integers(0, slack + 1))
        tint = np.asarray(COLOURS[item.colour], dtype=np.float32)
        patch = image[top:top + side, left:left + side]
        alpha = resized[:, :, None]
        patch[:] = patch * (1 - alpha) + tint * alpha
    return np.clip(image, 0, 255).astype(np.uint8)


def sample_key(shard: int, index: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}{index:0{INDEX_DIGITS}d}"


def shard_name(shard: int) -> str:
    return f"{shard:0{SHARD_DIGITS}d}.tar"


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def scene_samples(item_images: np.ndarray, item_labels: np.ndarray, shard: int, count: int,
                  canvas: int, seed: int) -> list[dict]:
    """The ``count`` samples of shard ``shard`` as img2dataset writes them (``__key__``,
    ``jpg``, ``txt``, ``json``), a function of (seed, shard) only."""
    rng = np.random.default_rng([seed, shard])
    by_class = [np.flatnonzero(item_labels == c) for c in range(len(ITEM_NAMES))]
    samples = []
    for index in range(count):
        items = draw_layout(rng)
        pictures = [item_images[by_class[i.kind][int(rng.integers(len(by_class[i.kind])))]]
                    for i in items]
        jpeg = encode_jpeg(render(items, pictures, canvas, rng))
        caption = describe(items)
        key = sample_key(shard, index)
        record = {"url": f"fashion-mnist-scene://{seed}/{key}", "caption": caption, "key": key,
                  "status": "success", "error_message": None, "width": canvas,
                  "height": canvas, "original_width": canvas, "original_height": canvas,
                  "exif": "{}", "sha256": hashlib.sha256(jpeg).hexdigest(),
                  "layout": [{"item": ITEM_NAMES[i.kind], "colour": i.colour,
                              "position": POSITIONS[i.position], "size": i.size}
                             for i in items]}
        samples.append({"__key__": key, "jpg": jpeg, "txt": caption.encode(),
                        "json": json.dumps(record).encode()})
    return samples


def shard_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0.0) as writer:  # the same bytes for the same scenes
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _parquet_bytes(samples: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(s["json"]) for s in samples]
    columns = ["url", "caption", "key", "status", "error_message", "width", "height",
               "original_width", "original_height", "exif", "sha256"]
    table = pa.table({c: [r[c] for r in records] for c in columns})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_caption_scenes(out_url: str, item_images: np.ndarray, item_labels: np.ndarray, *,
                         samples: int, shard_size: int = 1000, canvas: int = 64,
                         seed: int = 0) -> list[str]:
    """Publish ``samples`` scenes as img2dataset shards under ``out_url``; returns the shard
    URLs. ``item_images`` uint8 [N, 28, 28] and ``item_labels`` [N] are Fashion-MNIST's."""
    urls = []
    for shard, first in enumerate(range(0, samples, shard_size)):
        count = min(shard_size, samples - first)
        if count > 10 ** INDEX_DIGITS:
            raise ValueError(f"shard_size {shard_size} exceeds img2dataset's "
                             f"{10 ** INDEX_DIGITS} keys per shard")
        shard_samples = scene_samples(item_images, item_labels, shard, count, canvas, seed)
        stem = f"{shard:0{SHARD_DIGITS}d}"
        storage.publish_bytes(storage.join(out_url, f"{stem}.parquet"),
                              _parquet_bytes(shard_samples))
        storage.publish_json(storage.join(out_url, f"{stem}_stats.json"),
                             {"count": count, "successes": count, "failed_to_download": 0,
                              "failed_to_resize": 0, "status_dict": {"success": count}})
        url = storage.join(out_url, shard_name(shard))
        storage.publish_bytes(url, shard_bytes(shard_samples))
        urls.append(url)
    return urls
