"""A synthetic motion dataset whose classes only time can tell apart.

Each video shows one shape (an isosceles triangle, an arrow or a "T": mirror-symmetric,
with no rotational symmetry) that glides along a straight line and turns steadily.
The four classes are the vertical sense of the glide and the sense of the turn:

    0 falls, turning clockwise        1 falls, turning anticlockwise
    2 rises, turning clockwise        3 rises, turning anticlockwise

(image coordinates: "falls" moves down the screen). Played backwards, class 0 is
class 3 and class 1 is class 2; mirrored left-right, 0 <-> 1 and 2 <-> 3 (the
``flip_label_map`` written next to the lists).

Why averaging frames cannot beat chance: every class sees the same *set* of frames in
distribution. The path is centred on a uniformly drawn point of the region where the
whole path fits, and the start angle is uniform, so reversing a clip of one class gives
a clip of its reverse class with the same parameter distribution; reflecting a clip
across its own line of motion (the shapes are mirror-symmetric) turns a clockwise
clip into an anticlockwise one with the same path. Any model that maps frames to
features independently and averages them sees identically distributed inputs for all
four classes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

CLASS_NAMES = [
    "falls turning clockwise",
    "falls turning anticlockwise",
    "rises turning clockwise",
    "rises turning anticlockwise",
]
FLIP_LABEL_MAP = {0: 1, 1: 0, 2: 3, 3: 2}
REVERSE_LABEL_MAP = {0: 3, 3: 0, 1: 2, 2: 1}

_SHAPES = {
    # polygons in units of the shape radius, axis of symmetry along +x
    "triangle": [(1.0, 0.0), (-0.7, 0.55), (-0.7, -0.55)],
    "arrow": [(1.0, 0.0), (0.2, 0.6), (0.2, 0.22), (-0.9, 0.22), (-0.9, -0.22), (0.2, -0.22), (0.2, -0.6)],
    "tee": [(1.0, 0.7), (1.0, -0.7), (0.55, -0.7), (0.55, -0.2), (-0.9, -0.2), (-0.9, 0.2), (0.55, 0.2),
            (0.55, 0.7)],
}


SHAPE_WORDS = {"triangle": "triangle", "arrow": "arrow", "tee": "T shape"}

SPATIAL_DESCRIPTIONS = {
    c: ["a bright triangle, arrow or T shape on a dark, slightly noisy background",
        "one flat-coloured shape, about a fifth of the frame across"] for c in range(4)}
"""The classes look alike in a still frame: one spatial description fits all of them."""

TEMPORAL_DESCRIPTIONS = {
    0: ["the shape moves down the screen while it spins clockwise", "it falls, turning to the right as it goes"],
    1: ["the shape moves down the screen while it spins anticlockwise", "it falls, turning to the left as it goes"],
    2: ["the shape moves up the screen while it spins clockwise", "it rises, turning to the right as it goes"],
    3: ["the shape moves up the screen while it spins anticlockwise", "it rises, turning to the left as it goes"],
}

ZERO_SHOT_SPLITS = ([0, 1, 2], [1, 2, 3], [0, 2, 3])
"""Class subsets for exercising the zero-shot split protocol on the four classes."""


def caption(meta: dict) -> str:
    """A one-sentence caption of a clip from :func:`render_video`'s ``meta``, e.g.
    ``"a small red arrow falls to the left quickly, turning clockwise"``."""
    label = int(meta["label"])
    fg = meta["fg"]
    colour = ("red", "green", "blue")[int(np.argmax(fg))] if max(fg) - min(fg) > 50 else "pale"
    size = "small" if meta["radius"] < 0.205 else "large"
    verb = "falls" if label in (0, 1) else "rises"
    dx = math.cos(meta["phi"])
    side = "straight" if abs(dx) < 0.26 else ("to the right" if dx > 0 else "to the left")
    pace = "slowly" if meta["speed"] < 0.027 else "quickly"
    turn = "clockwise" if label in (0, 2) else "anticlockwise"
    return f"a {size} {colour} {SHAPE_WORDS[meta['shape']]} {verb} {side} {pace}, turning {turn}"


def render_video(label: int, rng: np.random.Generator, *, size: int = 40, frames: int = 16,
                 supersample: int = 4, meta: Optional[dict] = None) -> np.ndarray:
    """One clip of class ``label`` as ``uint8 (frames, size, size, 3)``.

    ``meta``, when given, is filled with the drawn parameters (shape, direction, size,
    speed, colours) for :func:`caption`; the random draws are the same either way.
    """
    from PIL import Image, ImageDraw

    if label not in range(4):
        raise ValueError(f"label must be 0..3, got {label}")
    falls, clockwise = label in (0, 1), label in (0, 2)
    shape_name = list(_SHAPES)[int(rng.integers(len(_SHAPES)))]
    shape = _SHAPES[shape_name]
    radius = size * rng.uniform(0.17, 0.24)
    speed = size * rng.uniform(0.022, 0.032)            # pixels per frame
    omega = math.radians(rng.uniform(14.0, 22.0))       # turn per frame
    phi = math.radians(rng.uniform(30.0, 150.0))        # downward directions (y grows downward)
    if not falls:
        phi += math.pi
    spin = omega if clockwise else -omega               # +angle is clockwise on screen (y down)
    a0 = rng.uniform(0.0, 2 * math.pi)
    d = np.array([math.cos(phi), math.sin(phi)])
    half = 0.5 * speed * (frames - 1) * np.abs(d)
    margin = radius + 1.0
    lo, hi = margin + half, size - margin - half
    centre = rng.uniform(lo, np.maximum(hi, lo))
    fg = rng.integers(120, 256, size=3)
    bg = rng.integers(0, 90, size=3)
    if meta is not None:
        meta.update(label=label, shape=shape_name, radius=radius / size,
                    speed=speed / size, phi=phi, fg=[int(c) for c in fg])
    S = size * supersample
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        p = centre + (t - 0.5 * (frames - 1)) * speed * d
        a = a0 + spin * t
        ca, sa = math.cos(a), math.sin(a)
        pts = [((p[0] + radius * (ca * x - sa * y)) * supersample, (p[1] + radius * (sa * x + ca * y)) * supersample)
               for x, y in shape]
        img = Image.new("RGB", (S, S), tuple(int(c) for c in bg))
        ImageDraw.Draw(img).polygon(pts, fill=tuple(int(c) for c in fg))
        small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
        small += rng.normal(0.0, 4.0, size=small.shape)
        out[t] = np.clip(small, 0, 255).astype(np.uint8)
    return out


def write_mp4(path: str, frames: np.ndarray, fps: int = 8, crf: int = 18, *, bframes: int = 0,
              gop: Optional[int] = None, pts_ms: Optional[Sequence[int]] = None, faststart: bool = False) -> None:
    """Write ``uint8 (T, H, W, 3)`` frames as an H.264 mp4 with PyAV (atomically).

    Args:
        fps: frame rate (the nominal rate when ``pts_ms`` is given).
        crf: x264 quality.
        bframes: B-frames between references (0: none, so decode order is display order).
        gop: keyframe interval in frames (default x264's); scene-cut keyframes are off
            when it is given, so keyframes fall exactly every ``gop`` frames.
        pts_ms: per-frame presentation times in milliseconds, for a variable-frame-rate file.
        faststart: put the index (moov atom) first, as streaming files have it.
    """
    import fractions

    import av

    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w", options={"movflags": "+faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        opts = {"crf": str(crf), "preset": "veryfast", "bf": str(int(bframes))}
        if gop is not None:
            opts.update(g=str(int(gop)), keyint_min=str(int(gop)), sc_threshold="0")
        s.options = opts
        ms = fractions.Fraction(1, 1000)
        if pts_ms is not None:
            if len(pts_ms) != len(frames) or any(b <= a for a, b in zip(pts_ms, pts_ms[1:])):
                raise ValueError("pts_ms must give one strictly increasing time per frame")
            s.time_base = s.codec_context.time_base = ms
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if pts_ms is not None:
                vf.pts, vf.time_base = int(pts_ms[i]), ms
            for pkt in s.encode(vf):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    os.replace(tmp, path)


def write_synthetic(out_dir: str, *, num_train: int = 800, num_val: int = 240, size: int = 40, frames: int = 16,
                    seed: int = 0, progress: bool = True) -> Dict[str, object]:
    """Write the dataset under ``out_dir`` and return the paths a config needs.

    Layout: ``videos/{train,val}/NNNNN.mp4``, ``train.txt`` (``path label`` lines),
    ``val.csv`` (CSV with a ``path,label`` header), ``classes.txt`` and
    ``flip_label_map.json``. Classes are balanced; each video's content depends only on
    ``seed`` and its index. ``done.json`` is written last, so a half-written directory
    is recognisable.

    For the video-language tasks it also writes ``train_captions.txt`` and
    ``val_captions.txt`` (``path<TAB>caption``, see :func:`caption`),
    ``descriptions_spatial.json`` / ``descriptions_temporal.json`` (MSTA's description
    files) and ``zero_shot_split{1,2,3}.txt`` (class subsets).
    """
    from tqdm import tqdm

    if num_train < 4 or num_val < 4:
        raise ValueError(f"need at least 4 train and 4 val videos (one per class), got {num_train} and {num_val}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    rows: Dict[str, List[str]] = {"train": [], "val": []}
    captions: Dict[str, List[str]] = {"train": [], "val": []}
    for split in rows:
        os.makedirs(os.path.join(out_dir, "videos", split), exist_ok=True)
    for split, i in tqdm(jobs, desc=f"writing synthetic videos to {out_dir}", disable=not progress, unit="video"):
        label = i % 4
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        rel = f"videos/{split}/{i:05d}.mp4"
        meta: dict = {}
        write_mp4(os.path.join(out_dir, rel), render_video(label, rng, size=size, frames=frames, meta=meta))
        rows[split].append(f"{rel} {label}" if split == "train" else f"{rel},{label}")
        captions[split].append(f"{rel}\t{caption(meta)}")
    paths = dict(root=out_dir, train_list=os.path.join(out_dir, "train.txt"),
                 val_list=os.path.join(out_dir, "val.csv"), class_names=os.path.join(out_dir, "classes.txt"),
                 flip_label_map=os.path.join(out_dir, "flip_label_map.json"))
    with open(paths["train_list"], "w") as f:
        f.write("\n".join(rows["train"]) + "\n")
    with open(paths["val_list"], "w") as f:
        f.write("path,label\n" + "\n".join(rows["val"]) + "\n")
    with open(paths["class_names"], "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    with open(paths["flip_label_map"], "w") as f:
        json.dump({str(k): v for k, v in FLIP_LABEL_MAP.items()}, f)
    for split in ("train", "val"):
        paths[f"{split}_captions"] = os.path.join(out_dir, f"{split}_captions.txt")
        with open(paths[f"{split}_captions"], "w") as f:
            f.write("\n".join(captions[split]) + "\n")
    for kind, desc in (("spatial", SPATIAL_DESCRIPTIONS), ("temporal", TEMPORAL_DESCRIPTIONS)):
        paths[f"{kind}_descriptions"] = os.path.join(out_dir, f"descriptions_{kind}.json")
        with open(paths[f"{kind}_descriptions"], "w") as f:
            json.dump({str(k): v for k, v in desc.items()}, f, indent=1)
    paths["zero_shot_splits"] = []
    for i, classes in enumerate(ZERO_SHOT_SPLITS, start=1):
        p = os.path.join(out_dir, f"zero_shot_split{i}.txt")
        with open(p, "w") as f:
            f.write("\n".join(str(c) for c in classes) + "\n")
        paths["zero_shot_splits"].append(p)
    with open(os.path.join(out_dir, "done.json"), "w") as f:
        json.dump(dict(num_train=num_train, num_val=num_val, size=size, frames=frames, seed=seed), f)
    return paths


def is_complete(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a fully written synthetic dataset."""
    return os.path.isfile(os.path.join(out_dir, "done.json"))
