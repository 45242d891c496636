"""Data-loader throughput per video decoder, and PyAV's memory on a long video.

    python -m benchmarks.bench_data                     # the full sweep (a few minutes on 2 cores)
    python -m benchmarks.bench_data --quick             # fewer clips, for a smoke run
    pytest benchmarks/bench_data.py --benchmark-only    # the same sweep under pytest-benchmark

Everything is made here at run time with PyAV: H.264 mp4 videos of two sizes (``small``
340x256, ``large`` 1280x720; 10 s at 25 fps, x264 ``veryfast``, default GOP, with
B-frames) and a JPEG frame folder per small video. Each case is a
:class:`~vpeft.data.VideoDataset` with the training transform (224 px, bicubic, 8 frames,
segment sampling) read through a ``DataLoader`` with 1 or 2 workers; it records clips/s
and, per worker, the peak resident memory (``VmHWM``) and its growth over the worker's
start (``VmRSS`` when it began). Each case runs ``--rounds`` times (default 2) with the
decoders interleaved and keeps its best round. Ratios are against decord in the same run,
same files.

``--long`` (also part of the sweep) measures one 60 s 640x360 video: the sparse PyAV
path against decoding every frame and then indexing (what vpeft's PyAV fallback did
before), each in a fresh process: wall time, decoded frames, peak RSS growth.

Results: ``benchmarks/results/<device>/data.json`` and ``data.md``. These are CPU
numbers of a shared machine: ratios within a run are meaningful, absolute numbers less so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"small": (256, 340), "large": (720, 1280)}
SECONDS, FPS = 10, 25
FRAMES_PER_CLIP = 8


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _scene(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """``n`` frames of moving textured blobs over a drifting gradient (compresses like video)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = rng.integers(0, 40, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w].astype(np.float32)
    blobs = [(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(-4, 4), rng.uniform(-3, 3), rng.uniform(0.05, 0.15) * h,
              rng.integers(80, 255, 3)) for _ in range(4)]
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        img = np.stack([(x + 2 * t) % w / w * 120, (y + t) % h / h * 120, np.full_like(x, 60)], -1) + tex
        for bx, by, vx, vy, r, col in blobs:
            cx, cy = (bx + vx * t) % w, (by + vy * t) % h
            m = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
            img[m] = col
        out[t] = np.clip(img, 0, 255)
    return out


def make_data(root: str, videos: int) -> Dict[str, str]:
    """Write the benchmark's videos, frame folders and list files under ``root``."""
    from PIL import Image

    from vpeft.data.synthetic import write_mp4

    lists = {}
    for size, (h, w) in SIZES.items():
        rows = []
        for i in range(videos):
            rel = f"{size}/{i:03d}.mp4"
            path = os.path.join(root, rel)
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                frames = _scene(h, w, SECONDS * FPS, seed=i)
                write_mp4(path, frames, fps=FPS, crf=23, bframes=3)
                if size == "small":
                    d = os.path.join(root, "frames", f"{i:03d}")
                    os.makedirs(d, exist_ok=True)
                    for k, f in enumerate(frames):
                        Image.fromarray(f).save(os.path.join(d, f"img_{k + 1:05d}.jpg"), quality=90)
            rows.append(f"{rel} {i % 4}")
        lists[size] = os.path.join(root, f"{size}.txt")
        Path(lists[size]).write_text("\n".join(rows) + "\n")
    lists["frames"] = os.path.join(root, "frames.txt")
    Path(lists["frames"]).write_text("".join(f"frames/{i:03d} {i % 4}\n" for i in range(videos)))
    return lists


class _Measured:
    """A dataset wrapper that reports the worker's pid, start RSS and peak RSS with each item."""

    def __init__(self, ds):
        self.ds = ds
        self.start_kb = None

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        if self.start_kb is None:
            self.start_kb = _status_kb("VmRSS")
        item = self.ds[key]
        item.update(pid=os.getpid(), start_kb=self.start_kb, hwm_kb=_status_kb("VmHWM"))
        return item


def _collate(items):
    from vpeft.data import collate

    out = collate(items)
    out["mem"] = [(it["pid"], it["start_kb"], it["hwm_kb"]) for it in items]
    return out


def run_case(list_file: str, root: str, decoder: str, workers: int, clips: int) -> dict:
    """clips/s and per-worker memory of one (source, decoder, workers) case."""
    import torch

    from vpeft.data import EpochSampler, TrainTransform, VideoDataset, read_list

    samples = read_list(list_file)
    ds = VideoDataset(root, samples, FRAMES_PER_CLIP, TrainTransform(224, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)),
                      sampling="segment", decoder=decoder, max_replacements=0)
    keys: list = []
    sampler = EpochSampler(len(ds), shuffle=True, seed=0)
    while len(keys) < clips:                   # (index, epoch) keys: a new draw of frames each pass
        sampler.set_epoch(len(keys) // len(ds))
        keys += list(sampler)
    keys = keys[:clips]
    loader = torch.utils.data.DataLoader(_Measured(ds), batch_size=1, sampler=keys, num_workers=workers,
                                         collate_fn=_collate, prefetch_factor=2)
    mem: Dict[int, list] = {}
    t0, first = time.perf_counter(), None
    n = 0
    for b in loader:
        if first is None:
            first = time.perf_counter()        # worker start-up is not throughput
        n += b["video"].shape[0]
        for pid, start, hwm in b["mem"]:
            m = mem.setdefault(pid, [start, hwm])
            m[1] = max(m[1], hwm)
    end = time.perf_counter()
    steady = (n - 1) / (end - first) if n > 1 and end > first else None
    return {"clips": n, "seconds": round(end - t0, 3), "clips_per_s": round(steady, 3) if steady else None,
            "workers_seen": len(mem),
            "peak_rss_mib_per_worker": round(max(m[1] for m in mem.values()) / 1024, 1),
            "rss_growth_mib_per_worker": round(max(m[1] - m[0] for m in mem.values()) / 1024, 1)}


# ----------------------------------------------------------------- a long video, sparse vs everything
def _decode_everything(path: str, indices: List[int]) -> np.ndarray:
    """The earlier PyAV fallback: decode every frame to RGB, stack, then index."""
    import av

    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack(frames)[indices]


def _long_child(path: str, mode: str) -> dict:
    import av  # noqa: F401  (loaded before the baseline: FFmpeg's libraries are not the decoding's memory)

    from vpeft.data.sampling import segment_indices
    from vpeft.data.video import open_video

    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if mode == "sparse":
        src = open_video(path, "pyav")
        idx = segment_indices(src.num_frames, FRAMES_PER_CLIP, train=False)
        out = src.get(idx)
        decoded, total = src.decoded_frames, src.num_frames
        src.close()
    else:
        import av

        with av.open(path) as c:
            total = c.streams.video[0].frames
        idx = segment_indices(total, FRAMES_PER_CLIP, train=False)
        out = _decode_everything(path, idx)
        decoded = total
    dt = time.perf_counter() - t0
    return {"mode": mode, "seconds": round(dt, 3), "decoded_frames": int(decoded), "total_frames": int(total),
            "rss_growth_mib": round((_status_kb("VmHWM") - base) / 1024, 1), "clip_shape": list(out.shape)}


def long_video(root: str) -> List[dict]:
    from vpeft.data.synthetic import write_mp4

    path = os.path.join(root, "long_640x360_60s.mp4")
    if not os.path.exists(path):
        write_mp4(path, _scene(360, 640, 60 * FPS, seed=99), fps=FPS, crf=23, bframes=3)
    out = []
    for mode in ("everything", "sparse"):
        r = subprocess.run([sys.executable, __file__, "--_long-child", path, mode], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------- the sweep and its report
def sweep(root: str, *, videos: int, clips: int, rounds: int = 2, workers=(1, 2), progress=True) -> dict:
    from vpeft.data.video import DECODERS, decoder_status

    status = decoder_status()
    lists = make_data(root, videos)
    records = []
    for source in ("small", "large", "frames"):
        decs = ["frames"] if source == "frames" else list(DECODERS)
        for w in workers:
            group = []
            for dec in decs:
                rec = {"source": source, "decoder": dec, "workers": w}
                if dec != "frames" and status[dec] is not None:
                    rec.update(status="skipped", reason=status[dec])
                group.append(rec)
            n = clips if source != "large" else max(4, clips // 2)
            for rnd in range(rounds):          # decoders interleaved, best round kept: less noise from other load
                for rec in group:
                    if rec.get("status") == "skipped":
                        continue
                    m = run_case(lists[source], root, "auto" if rec["decoder"] == "frames" else rec["decoder"], w, n)
                    if progress:
                        print(json.dumps({**rec, "round": rnd, **m}), file=sys.stderr, flush=True)
                    if "clips_per_s" not in rec or (m["clips_per_s"] or 0) > (rec["clips_per_s"] or 0):
                        rec.update(status="ok", rounds=rounds, **m)
            records += group
    for r in records:
        ref = next((x for x in records if x["source"] == r["source"] and x["decoder"] == "decord"
                    and x["workers"] == r["workers"] and x["status"] == "ok"), None)
        if r["status"] == "ok" and ref is not None and r["clips_per_s"] and ref["clips_per_s"]:
            r["clips_per_s_vs_decord"] = round(r["clips_per_s"] / ref["clips_per_s"], 2)
            r["rss_growth_vs_decord"] = round(r["rss_growth_mib_per_worker"] / max(ref["rss_growth_mib_per_worker"],
                                                                                    0.1), 2)
    return {"records": records, "long_video": long_video(root), "decoder_status": status}


def markdown(result: dict, env: dict) -> str:
    lines = [f"Data-loader throughput ({env['device']}; {env['date_utc']} UTC; commit {env['git_commit']}; "
             f"load average {env['load_average_1min']}). 8 frames per clip, segment sampling, training transform "
             f"at 224 px; small = 340x256, large = 1280x720 H.264 (10 s, 25 fps, B-frames), frames = JPEG folders "
             f"of the small videos; best of {result['records'][0].get('rounds', 1)} interleaved rounds. Peak RSS is "
             f"per worker process (forked from a parent holding torch); growth is over the worker's RSS when it "
             f"started and includes the transform's float copy of the frames.", "",
             "| source | decoder | workers | clips/s | vs decord | peak RSS MiB | RSS growth MiB | growth vs decord |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['source']} | {r['decoder']} | {r['workers']} | skipped: {r['reason']} | | | | |")
            continue
        lines.append(f"| {r['source']} | {r['decoder']} | {r['workers']} | {r['clips_per_s']} | "
                     f"{r.get('clips_per_s_vs_decord', '')} | {r['peak_rss_mib_per_worker']} | "
                     f"{r['rss_growth_mib_per_worker']} | {r.get('rss_growth_vs_decord', '')} |")
    lines += ["", "PyAV on one 60 s 640x360 video (1500 frames), one 8-frame segment clip, fresh process each:", "",
              "| PyAV path | seconds | frames decoded | RSS growth MiB |", "|---|---|---|---|"]
    for r in result["long_video"]:
        name = "decode every frame, then index (before)" if r["mode"] == "everything" else "sparse (now)"
        lines.append(f"| {name} | {r['seconds']} | {r['decoded_frames']} of {r['total_frames']} | "
                     f"{r['rss_growth_mib']} |")
    return "\n".join(lines) + "\n"


def run(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 videos, 6 clips per case")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--clips", type=int, default=16, help="clips per case (large videos: half)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per case, decoders interleaved; the best is kept")
    p.add_argument("--data", help="directory for the generated videos (default: a temporary one)")
    p.add_argument("--_long-child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._long_child:
        print(json.dumps(_long_child(*a._long_child)))
        return {}
    from benchmarks import common

    videos, clips, rounds = (2, 6, 1) if a.quick else (a.videos, a.clips, a.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        result = sweep(a.data or tmp, videos=videos, clips=clips, rounds=rounds)
    env = common.environment(common.command_line())
    out = common.results_dir() / "data.json"
    out.write_text(json.dumps({**env, **result}, indent=1, default=str) + "\n")
    md = markdown(result, env)
    (out.parent / "data.md").write_text(md)
    print(md)
    return result


def test_data_loader_throughput(benchmark):
    """The sweep under pytest-benchmark (``--benchmark-only``): one round, results written as above."""
    benchmark.pedantic(lambda: run(["--quick"] if os.environ.get("VPEFT_BENCH_QUICK") else []), rounds=1,
                       iterations=1)


if __name__ == "__main__":
    run()
