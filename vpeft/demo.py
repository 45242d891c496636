"""``vpeft demo``: train and compare the methods on the synthetic motion dataset, on a CPU.

The backbone is a small randomly initialised open_clip ViT (no weights can be
downloaded here), so what each method learns it learns from motion alone. The
frame-mean linear probe averages per-frame features and is blind to frame order; the
dataset is built so that this leaves it at chance (25 %), while methods with temporal
modelling can tell the classes apart.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

# name, method, adapt() options, learning rate, optimizer steps. Sizes, learning rates and
# steps were chosen by running the demo on a 2-core CPU: with a random backbone the
# backbone-side adapters learn motion slowly. MSTA is slowest: with these settings its loss
# starts to fall after about 200 steps; the other settings tried (scale 0.05 to 1.0, lr 1e-3
# to 1e-2, bottleneck 32 or 96, layers 1-3 or 1-4, 200-300 steps) stayed near chance. The
# paper's scale 0.005 was not tried. Side4Video's own temporal stem learns motion fast.
DEMO_METHODS = [
    ("probe", "linear_probe", {}, 3e-3, 300),
    ("st_adapter", "st_adapter", {"bottleneck": 64}, 1e-2, 300),
    ("msta", "msta", {"bottleneck": 32, "layers": [1, 4], "scale": 0.25, "adapter_dropout": 0.0, "text": False},
     1e-2, 500),
    ("side4video", "side4video", {"side_width": 64}, 1e-3, 300),
]
DEMO_DATA = dict(num_train=800, num_val=240)


class PeakRSS:
    """Peak resident set size of this process above a baseline, sampled every 5 ms (Linux).

    The baseline is the RSS when the monitor starts; the result is in MiB, or None where
    ``/proc/self/statm`` does not exist. Loader worker processes are not included.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self._stop = threading.Event()
        self.base = self.peak = self._rss()

    def _rss(self) -> int:
        if not self.available:
            return 0
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> Optional[float]:
        return (self.peak - self.base) / 2 ** 20 if self.available else None


def demo_config(data: Dict[str, str], out_dir: str, name: str, method: str, options: Dict[str, Any], lr: float,
                steps: int, workers: int) -> Dict[str, Any]:
    """The configuration the demo trains ``method`` with (the ``demo`` preset plus per-method values)."""
    from .engine.config import load_config

    return load_config("demo", extra={
        "model": {"method": method, "options": options},
        "data": {"root": data["root"], "train_list": data["train_list"], "val_list": data["val_list"],
                 "class_names": data["class_names"], "flip_label_map": data["flip_label_map"],
                 "num_workers": workers},
        "train": {"lr": lr, "max_steps": steps},
        "output_dir": os.path.join(out_dir, "runs", name),
    })


def _plot(results: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [h["step"] for h in r["history"]]
        loss = [h["loss"] for h in r["history"]]
        k = 10
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        a.plot(steps, smooth, label=r["name"])
        ev = r["evals"]
        b.plot([e["step"] for e in ev], [e["top1"] for e in ev], marker="o", label=r["name"])
    a.set(title="training loss (10-step running mean)", xlabel="optimizer step", ylabel="cross-entropy")
    b.axhline(25.0, color="gray", linestyle="--", label="chance")
    b.set(title="held-out top-1 (%)", xlabel="optimizer step", ylabel="top-1 %", ylim=(0, 100))
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: List[Dict[str, Any]]) -> str:
    """The demo's markdown table."""
    lines = ["| method | trainable params | steps | peak RSS increase (MiB, CPU) | train clips/s | top-1 % | "
             "mean-class % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        mem = "n/a" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['name']} | {r['trainable_parameters']:,} | {r['steps']} | {mem} | {r['clips_per_s']:.1f} | "
                     f"{r['top1']:.1f} | {r['mean_class']:.1f} |")
    return "\n".join(lines)


def _train_worker(cfg: Dict[str, Any], progress: bool, threads: int, queue) -> None:
    from .engine.trainer import Trainer

    torch.set_num_threads(threads)
    try:
        trainer = Trainer(cfg, progress=progress, overwrite=True)   # a fresh run each time; set-up is not counted
        with PeakRSS() as mem:
            summary = trainer.fit()
        queue.put(("ok", summary, mem.mib))
    except BaseException as e:  # noqa: BLE001 - report to the parent, which re-raises
        import traceback

        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))


def _train_in_fresh_process(cfg: Dict[str, Any], progress: bool, threads: int):
    """Train in a fresh (spawned) process so each method's peak RSS is its own: memory a
    previous method freed but the allocator kept would otherwise hide the next one's."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_worker, args=(cfg, progress, threads, queue), daemon=False)
    proc.start()
    try:
        status, payload, peak = queue.get()
    finally:
        proc.join()
    if status != "ok":
        raise RuntimeError(f"demo run {cfg['output_dir']} failed: {payload}")
    return payload, peak


def run_demo(out_dir: str = "vpeft-demo", *, steps: Optional[int] = None, methods: Optional[Sequence[str]] = None,
             progress: bool = True) -> List[Dict[str, Any]]:
    """Write the synthetic dataset if absent, train and evaluate each method, print the
    table and save ``results.json``, ``results.md`` and ``curves.png`` under ``out_dir``."""
    from .data.synthetic import is_complete, write_synthetic
    from .engine.runlog import read_jsonl

    t_start = time.time()
    chosen = [m for m in DEMO_METHODS if methods is None or m[0] in methods]
    if methods is not None and len(chosen) != len(set(methods)):
        known = [m[0] for m in DEMO_METHODS]
        raise ValueError(f"unknown demo method(s) {sorted(set(methods) - set(known))}; expected some of {known}")
    cpus = os.cpu_count() or 1
    # one core computes, the rest decode video; on 2 cores torch threads fighting the loader are slower
    torch.set_num_threads(max(1, cpus - 1))
    workers = 1 if cpus <= 2 else min(4, cpus // 2)
    data_dir = os.path.join(out_dir, "data")
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(root=data_dir, train_list=os.path.join(data_dir, "train.txt"),
                 val_list=os.path.join(data_dir, "val.csv"), class_names=os.path.join(data_dir, "classes.txt"),
                 flip_label_map=os.path.join(data_dir, "flip_label_map.json"))
    if not is_complete(data_dir):
        write_synthetic(data_dir, progress=progress, **DEMO_DATA)
    results = []
    for name, method, options, lr, own_steps in chosen:
        cfg = demo_config(paths, out_dir, name, method, options, lr, steps or own_steps, workers)
        print(f"\n== {name}: vpeft.adapt(..., {method!r}, **{options}), lr {lr}, {steps or own_steps} steps",
              flush=True)
        summary, peak = _train_in_fresh_process(cfg, progress, torch.get_num_threads())
        evals = [r for r in read_jsonl(os.path.join(cfg["output_dir"], "metrics.jsonl")) if r.get("split") == "val"]
        ev = summary["eval"]
        results.append({"name": name, "method": method, "options": options, "lr": lr, "steps": summary["steps"],
                        "trainable_parameters": summary["trainable_parameters"], "peak_rss_mib": peak,
                        "clips_per_s": summary["clips_per_s"], "top1": ev["top1"], "top5": ev["top5"],
                        "mean_class": ev["mean_class"], "val_videos": ev["videos"],
                        "skipped_videos": summary["skipped_videos"], "history": summary["history"],
                        "evals": evals})
        print(f"   top-1 {ev['top1']:.1f} %  ({ev['videos']} held-out clips, chance 25 %)", flush=True)
    table = format_table(results)
    wall = time.time() - t_start
    print("\n" + table)
    print(f"\n{len(results)} methods, batch {cfg['train']['batch_size']} clips of {cfg['model']['num_frames']} frames, "
          f"{torch.get_num_threads()} compute thread(s) + {workers} loader worker(s); "
          f"wall time {wall:.0f} s")
    print("peak RSS increase: resident memory of the training process (a fresh process per method) during "
          "training and evaluation, above its level once the model, data and optimizer were set up; sampled "
          "every 5 ms; excludes the loader worker process; CPU RAM, not GPU memory.")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"wall_time_s": wall, "results": results}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    png = os.path.join(out_dir, "curves.png")
    _plot(results, png)
    print(f"curves: {png}; table: {os.path.join(out_dir, 'results.md')}")
    return results
