"""Tables and charts from the end-to-end training-step results (``benchmarks/bench_e2e.py``).

Regenerate the README section from the committed results::

    python -m benchmarks.report            # print it
    python -m benchmarks.report --readme   # and write it into README.md (between markers)
    python -m benchmarks.report --device cpu --write   # rewrite one device's e2e.md / e2e.png

Measured numbers and estimates are kept apart and labelled. A GPU that has no results
file contributes nothing; when no GPU results are committed the section says so. CPU
results come from tiny random backbones and are labelled as not comparable to anything
in the papers. The memory table comes from ``benchmarks/results/estimate/memory.json``
(``pytest benchmarks/bench_e2e.py --benchmark-only -k estimated``): paper-sized steps
estimated by :mod:`vpeft.memory`, with the papers' GB and any GPU measurement beside.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT.parent / "README.md"
FILE = "e2e.json"
BEGIN, END = "<!-- e2e-results:begin -->", "<!-- e2e-results:end -->"
MEM_BEGIN, MEM_END = "<!-- memory-estimates:begin -->", "<!-- memory-estimates:end -->"
ESTIMATE_DIR, ESTIMATE_FILE = "estimate", "memory.json"
ESTIMATE_LABEL = "estimated by exact tensor accounting on the CPU; allocator overhead not included"
REGENERATE = "python -m benchmarks.report --readme"
RUN = "pytest benchmarks/ --benchmark-only"

METHOD_NAMES = {
    "full_finetune": "full fine-tuning", "linear_probe": "linear probe",
    "st_adapter_12x384": "ST-Adapter 12x384", "st_adapter_24x384": "ST-Adapter 24x384", "msta": "MSTA",
    "side4video_light": "Side4Video light", "side4video": "Side4Video",
}
METHOD_ORDER = list(METHOD_NAMES)
BACKBONE_ORDER = ["ViT-B-16", "ViT-L-14", "EVA02-E-14", "tiny-vit", "tiny-eva"]

# METHODS.md section 4: training memory in GB, SSv2, 8 frames, A100, batch 32 (B/16) / 16 (L/14).
# The papers' table does not say which ST-Adapter preset it used; it is shown beside both.
PAPER_MEMORY_GB = {
    ("ViT-B-16", "st_adapter_12x384"): 28.8, ("ViT-B-16", "st_adapter_24x384"): 28.8,
    ("ViT-B-16", "side4video_light"): 8.9, ("ViT-B-16", "side4video"): 18.8,
    ("ViT-L-14", "st_adapter_12x384"): 51.4, ("ViT-L-14", "st_adapter_24x384"): 51.4,
    ("ViT-L-14", "side4video_light"): 15.3, ("ViT-L-14", "side4video"): 37.0,
}

# The targets (measured on an H100): (description, check over records).
TARGETS = [
    ("ST-Adapter B/16, batch 32, 8 frames: peak <= 14 GB", ("ViT-B-16", "st_adapter_12x384", 8), "mem", 14.0),
    ("Side4Video light B/16, batch 32, 8 frames: peak <= 6 GB", ("ViT-B-16", "side4video_light", 8), "mem", 6.0),
    ("Side4Video L/14 24x512, batch 16, 8 frames: peak <= 25 GB", ("ViT-L-14", "side4video", 8), "mem", 25.0),
    ("Side4Video E/14 32x576, batch 16, 8 frames: trains within 40 GB", ("EVA02-E-14", "side4video_light", 8),
     "mem", 40.0),
    ("ST-Adapter B/16: fused >= 1.3x eager clips/s", ("ViT-B-16", "st_adapter_12x384", 8), "speedup", 1.3),
    ("Side4Video B/16: fused >= 1.3x eager clips/s", ("ViT-B-16", "side4video", 8), "speedup", 1.3),
]


def load(device: str, root: Path = RESULTS) -> Optional[dict]:
    path = Path(root) / device / FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def devices(root: Path = RESULTS) -> List[str]:
    if not Path(root).exists():
        return []
    return sorted(p.name for p in Path(root).iterdir() if (p / FILE).exists())


def _order(r: dict) -> tuple:
    b = BACKBONE_ORDER.index(r["backbone"]) if r["backbone"] in BACKBONE_ORDER else 99
    m = METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99
    return (b, m, r["frames"], r["backend"])


def _gb(v) -> str:
    return "n/m" if v is None else f"{v:.2f}"


def _num(v, fmt="{:,}") -> str:
    return "" if v is None else fmt.format(v)


def _status(r: dict) -> str:
    if r["status"] == "oom":
        budget = f" in {r['budget_gb']:g} GB" if r.get("budget_gb") else ""
        return f"**OOM**{budget} ({r.get('oom_phase', '?')})"
    return "ok"


def is_cpu(data: dict) -> bool:
    return any(r.get("device_type") == "cpu" for r in data.get("records", []))


def _all_eager(data: dict) -> bool:
    return all(set(b) <= {"eager"} for r in data.get("records", []) for b in (r.get("op_backends") or {}).values())


def cpu_label(data: Optional[dict] = None) -> str:
    text = ("**CPU run on tiny random backbones** (tiny-vit: 6x128 ViT at 32 px; tiny-eva: 4x192 post-norm EVA "
            "at 56 px). These numbers check that the suite works; they are not comparable to the papers or "
            "to any GPU result. Peak memory is not measured on the CPU (n/m): the CUDA allocator's "
            "statistics are the memory measurement.")
    if data is not None and _all_eager(data):
        text += (" No fused backend ran in this run, so the 'fused' rows ran the same eager ops as the "
                 "'eager' rows (see 'ops ran on'): their differences in clips/s are timing noise.")
    return text


def device_markdown(data: dict) -> str:
    """The full per-device table (every record) with the run's environment."""
    recs = sorted(data.get("records", []), key=_order)
    env = data.get("env", {})
    lines = [f"# End-to-end training step: {env.get('device', '?')}", ""]
    if is_cpu(data):
        lines += [cpu_label(data), ""]
    lines += ["One full training step (forward, backward, AdamW) on synthetic clips, all in "
              f"{recs[0]['dtype'] if recs else 'bf16'}; clips/s from the median step time. "
              "GB = 10^9 bytes. FLOPs per clip counted by `torch.utils.flop_counter` "
              "(forward + backward, eager ops).", ""]
    for k in ("command", "torch", "torch_cuda_build", "triton", "open_clip_torch", "timm", "flash_attn", "git_commit",
              "date_utc", "cpu_threads", "load_average_1min"):
        lines.append(f"- {k}: `{env.get(k)}`")
    if env.get("vpeft_backends"):
        lines.append(f"- vpeft backends: `{env.get('vpeft_backends')}`")
    lines += ["", "| backbone | method | T | batch | backend | status | peak alloc GB | peak reserved GB | "
              "clips/s | trainable params | GFLOPs/clip | ops ran on | frozen-tower attention |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        ops = ", ".join(f"{op}: {'/'.join(b)}" for op, b in (r.get("op_backends") or {}).items()) or "-"
        flops = r.get("flops_per_clip")
        lines.append("| " + " | ".join([
            r["backbone"], METHOD_NAMES.get(r["method"], r["method"]), str(r["frames"]), str(r["batch"]),
            r["backend"], _status(r), _gb(r.get("peak_allocated_gb")) if r["status"] == "ok" else "-",
            _gb(r.get("peak_reserved_gb")) if r["status"] == "ok" else "-",
            _num(r.get("clips_per_s"), "{:.2f}"), _num(r.get("trainable_params")),
            "" if flops is None else f"{flops / 1e9:.1f}", ops, r.get("attention", "-") or "-"]) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> Path:
    """Bar chart of peak memory and clips/s per case (8 frames first); OOM cases are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = sorted(data.get("records", []), key=lambda r: (r["frames"],) + _order(r))
    labels = [f"{r['backbone']} {METHOD_NAMES.get(r['method'], r['method'])} T{r['frames']} {r['backend']}"
              for r in recs]
    mem = [r.get("peak_allocated_gb") if r["status"] == "ok" else None for r in recs]
    cps = [r.get("clips_per_s") if r["status"] == "ok" else None for r in recs]
    height = max(3.0, 0.28 * len(recs) + 1.5)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(14, height), sharey=True)
    y = list(range(len(recs)))
    colors = ["tab:blue" if r["backend"] == "eager" else "tab:orange" for r in recs]
    ax_m.barh(y, [m or 0 for m in mem], color=colors)
    ax_t.barh(y, [c or 0 for c in cps], color=colors)
    for i, r in enumerate(recs):
        if r["status"] == "oom":
            for ax in (ax_m, ax_t):
                ax.text(0, i, "  OOM", va="center", color="red", fontsize=7)
    ax_m.set_yticks(y)
    ax_m.set_yticklabels(labels, fontsize=7)
    ax_m.invert_yaxis()
    ax_m.set_xlabel("peak allocated memory (GB)")
    ax_t.set_xlabel("clips / s")
    if all(m is None for m in mem):
        ax_m.text(0.5, 0.5, "peak memory not measured\n(no CUDA device)", transform=ax_m.transAxes,
                  ha="center", va="center", color="gray")
    title = f"training step, {data.get('env', {}).get('device', '?')} (blue: eager, orange: fused)"
    if is_cpu(data):
        title = "CPU, tiny random backbones, NOT comparable to GPU/papers - " + title
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_device(data: dict, directory: Path) -> Tuple[Path, Path]:
    directory = Path(directory)
    md = directory / "e2e.md"
    md.write_text(device_markdown(data))
    png = plot(data, directory / "e2e.png")
    return md, png


def _find(recs: Iterable[dict], backbone: str, method: str, frames: int, backend: str,
          variant: str = "") -> Optional[dict]:
    for r in recs:
        if (r["backbone"], r["method"], r["frames"], r["backend"], r.get("variant", "")) == (
                backbone, method, frames, backend, variant):
            return r
    return None


def targets_markdown(data: dict) -> List[str]:
    recs = data.get("records", [])
    out = []
    for text, (bb, method, frames), kind, limit in TARGETS:
        if kind == "mem":
            found = [r for r in (_find(recs, bb, method, frames, b) for b in ("eager", "fused")) if r]
            ok = [r for r in found if r["status"] == "ok"]
            if not found:
                verdict = "not measured"
            elif not ok:
                verdict = "**not met** (out of memory)"
            else:
                best = min(r["peak_allocated_gb"] for r in ok)
                verdict = f"{'met' if best <= limit else '**not met**'}: {best:.2f} GB (best backend)"
        else:
            e, f = _find(recs, bb, method, frames, "eager"), _find(recs, bb, method, frames, "fused")
            if not (e and f and e["status"] == f["status"] == "ok"):
                verdict = "not measured"
            else:
                ratio = f["clips_per_s"] / e["clips_per_s"]
                verdict = f"{'met' if ratio >= limit else '**not met**'}: {ratio:.2f}x"
        out.append(f"- {text}: {verdict}")
    return out


def summary_markdown(data: dict, frames: int = 8) -> List[str]:
    """Method x backbone at ``frames``: memory and clips/s per backend, trainable params, paper memory."""
    recs = data.get("records", [])
    keys = sorted({(r["backbone"], r["method"]) for r in recs if r["frames"] == frames},
                  key=lambda k: _order(dict(backbone=k[0], method=k[1], frames=0, backend="")))
    lines = ["| method | backbone | batch | peak alloc GB eager / fused | clips/s eager / fused | "
             "trainable params | paper memory (A100) |", "|---|---|---|---|---|---|---|"]
    for bb, method in keys:
        e, f = _find(recs, bb, method, frames, "eager"), _find(recs, bb, method, frames, "fused")

        def mem(r):
            return "-" if r is None else ("OOM" if r["status"] == "oom" else _gb(r.get("peak_allocated_gb")))

        def cps(r):
            return "-" if r is None else ("OOM" if r["status"] == "oom" else f"{r['clips_per_s']:.2f}")

        any_r = e or f
        params = next((r.get("trainable_params") for r in (e, f) if r and r.get("trainable_params")), None)
        paper = PAPER_MEMORY_GB.get((bb, method))
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {bb} | {any_r['batch']} | {mem(e)} / {mem(f)} | "
                     f"{cps(e)} / {cps(f)} | {_num(params)} | {'' if paper is None else f'{paper} GB'} |")
    return lines


def readme_section(root: Path = RESULTS) -> str:
    found = devices(root)
    gpus = [d for d in found if d != "cpu"]
    lines = [BEGIN, "", "### Measured training-step memory and throughput", "",
             f"Generated by `{REGENERATE}` from `benchmarks/results/*/{FILE}`, which "
             f"`{RUN}` writes. Peak allocated memory of one full training step (forward, backward, "
             "AdamW) in bf16 at 8 frames, batch 32 (B/16) or 16 (L/14, E/14), GB = 10^9 bytes. "
             "The papers' column is METHODS.md section 4 (A100, SSv2, 8 frames; it does not say which "
             "ST-Adapter preset).", ""]
    if not gpus:
        lines += ["**No GPU results are committed yet**, so there is no measured GPU number here (the memory "
                  "table above is estimated, not measured). Run `{RUN}` on a CUDA machine, commit `benchmarks/results/<gpu>/`, then "
                  f"`{REGENERATE}`.", ""]
    for d in gpus:
        data = load(d, root)
        lines += [f"#### {data.get('env', {}).get('device', d)}", ""] + summary_markdown(data)
        lines += ["", "Targets:"] + targets_markdown(data) + [""]
    if "cpu" in found:
        data = load("cpu", root)
        lines += ["#### CPU (tiny backbones; not comparable)", "", cpu_label(data), ""] + summary_markdown(data)
        lines += [""]
    lines += [END]
    return "\n".join(lines)


def load_estimates(root: Path = RESULTS) -> Optional[dict]:
    path = Path(root) / ESTIMATE_DIR / ESTIMATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _measured(root: Path, backbone: str, method: str, frames: int, backend: str, batch: int) -> List[Tuple[str, float]]:
    """(GPU name, measured peak GB) of the same case in every committed GPU results file."""
    out = []
    for d in devices(root):
        data = load(d, root)
        if d == "cpu" or data is None:
            continue
        for r in data.get("records", []):
            if ((r["backbone"], r["method"], r["frames"], r["backend"], r["batch"]) == (backbone, method, frames, backend, batch)
                    and r["status"] == "ok" and r.get("peak_allocated_gb")):
                out.append((data.get("env", {}).get("device", d), r["peak_allocated_gb"]))
    return out


def _opts(r: dict) -> str:
    o = {k: v for k, v in (r.get("options") or {}).items() if k not in ("side_layers", "side_width", "preset")}
    return ", ".join(f"{k}={v}" for k, v in o.items()) or "-"


def _rec_gb(r: Optional[dict], key: str) -> str:
    """``r[key]`` bytes as GB with two decimals, or ``-`` without a record."""
    return "-" if r is None else f"{r[key] / 1e9:.2f}"


def _pair(eager: Optional[dict], fused: Optional[dict], key: str) -> str:
    """The ``eager / fused`` cell of ``key`` in GB."""
    return f"{_rec_gb(eager, key)} / {_rec_gb(fused, key)}"


def _took(*recs: Optional[dict]) -> str:
    """How long each present estimate took, ``eager / fused``."""
    return " / ".join(f"{r['seconds']:.0f} s" for r in recs if r is not None)


def _base(recs: Iterable[dict]) -> List[dict]:
    """The preset rows of the estimate records (not the recompute-option variants)."""
    return [r for r in recs if not r.get("variant")]


def _case_keys(recs: List[dict]) -> List[tuple]:
    return sorted({(r["backbone"], r["method"], r["frames"]) for r in _base(recs)},
                  key=lambda k: _order(dict(backbone=k[0], method=k[1], frames=k[2], backend="")))


def estimates_markdown(data: dict, root: Path = RESULTS) -> List[str]:
    """Method x backbone: estimated peak and saved bytes, eager / fused, with the papers' GB and any GPU measurement."""
    recs = data.get("records", [])
    keys = _case_keys(recs)
    lines = [f"| method | backbone | batch | options | estimated peak GB eager / fused | saved for backward GB "
             "eager / fused | TFLOP / step | paper (A100) | measured on a GPU (measured / estimated) | "
             "estimate took |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bb, method, frames in keys:
        e, f = _find(recs, bb, method, frames, "eager"), _find(recs, bb, method, frames, "fused")
        any_r = e or f
        side = ""
        if method.startswith("side4video") and any_r.get("options"):
            side = f" {any_r['options'].get('side_layers')}x{any_r['options'].get('side_width')}"
        flops = next((r.get("flops") for r in (e, f) if r and r.get("flops")), None)
        paper = PAPER_MEMORY_GB.get((bb, method))
        meas = []
        for r in (e, f):
            if r is not None:
                for dev, m in _measured(root, bb, method, frames, r["backend"], r["batch"]):
                    meas.append(f"{r['backend']} {m:.2f} GB on {dev} ({m * 1e9 / r['peak_allocated_bytes']:.2f})")
        lines.append(f"| {METHOD_NAMES.get(method, method)}{side} | {bb} | {any_r['batch']} | {_opts(any_r)} | "
                     f"{_pair(e, f, 'peak_allocated_bytes')} | "
                     f"{_pair(e, f, 'saved_bytes')} | "
                     f"{'' if flops is None else f'{flops / 1e12:.1f}'} | {'' if paper is None else f'{paper} GB'} | "
                     f"{'; '.join(meas) or 'none yet'} | {_took(e, f)} |")
    return lines


def options_markdown(data: dict) -> List[str]:
    """The recompute-option rows: peak and saved bytes with each option, eager / fused, and the
    FLOPs of the step over those of the preset's own step at the same size (same backend)."""
    recs = [r for r in data.get("records", []) if r.get("variant")]
    if not recs:
        return []
    keys = sorted({(r["backbone"], r["method"], r["frames"], r["variant"]) for r in recs},
                  key=lambda k: (_order(dict(backbone=k[0], method=k[1], frames=k[2], backend="")), k[3]))
    lines = ["| method | backbone | frames | batch | options over the preset's | estimated peak GB eager / fused | "
             "saved for backward GB eager / fused | preset's own peak GB eager / fused | FLOPs over the "
             "preset's step | estimate took |", "|---|---|---|---|---|---|---|---|---|---|"]
    for bb, method, frames, variant in keys:
        e, f = (_find(recs, bb, method, frames, b, variant) for b in ("eager", "fused"))
        base_e, base_f = (_find(data["records"], bb, method, frames, b) for b in ("eager", "fused"))
        any_r = e or f
        ratio = "-"
        for r, b in ((e, base_e), (f, base_f)):
            if r and b and r.get("flops") and b.get("flops") and r["batch"] == b["batch"]:
                ratio = f"{r['flops'] / b['flops']:.2f}x"
                break
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {bb} | {frames} | {any_r['batch']} | "
                     f"{variant if variant != 'preset' else '(the preset at this size)'} | "
                     f"{_pair(e, f, 'peak_allocated_bytes')} | "
                     f"{_pair(e, f, 'saved_bytes')} | "
                     f"{_pair(base_e, base_f, 'peak_allocated_bytes')} | {ratio} | {_took(e, f)} |")
    return lines


def _options_section(data: dict) -> List[str]:
    rows = options_markdown(data)
    if not rows:
        return []
    return ["", "#### Recompute options (estimated the same way)", "",
            "What each option of `vpeft.adapt` removes from the step above (`vpeft/memory_options.py` says "
            "what it saves and costs); FLOPs counted by `torch.utils.flop_counter` on the same fake step (fused "
            "custom ops count 0, so the ratio is the eager one when both exist). One row: `vpeft estimate "
            "--method PRESET --backbone BACKBONE --frames F --option KEY=VALUE`.", ""] + rows


def plot_estimates(data: dict, path: Path) -> Path:
    """Bars of the estimated peak (eager, fused) per case, the papers' GB as a marker, labelled as estimates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = data.get("records", [])
    keys = _case_keys(recs)
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.42 * len(keys) + 1.6)))
    y = list(range(len(keys)))
    for off, backend, color in ((-0.2, "eager", "tab:blue"), (0.2, "fused", "tab:orange")):
        vals = [(_find(recs, bb, m, fr, backend) or {}).get("peak_allocated_bytes", 0) / 1e9 for bb, m, fr in keys]
        ax.barh([v + off for v in y], vals, height=0.4, color=color, label=f"estimated, {backend}")
    px = [(i, PAPER_MEMORY_GB.get((bb, m))) for i, (bb, m, _) in enumerate(keys)]
    px = [(i, v) for i, v in px if v is not None]
    if px:
        ax.scatter([v for _, v in px], [i for i, _ in px], marker="D", color="black", zorder=3,
                   label="paper, measured on an A100")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{bb} {METHOD_NAMES.get(m, m)} T{fr} (batch {(_find(recs, bb, m, fr, 'eager') or _find(recs, bb, m, fr, 'fused'))['batch']})"
                        for bb, m, fr in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peak allocated memory of one training step (GB = 10^9 bytes)")
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Training-step memory, " + ESTIMATE_LABEL, fontsize=9)
    return _save(fig, path)


def write_estimates(data: dict, directory: Path) -> Tuple[Path, Path]:
    directory = Path(directory)
    md = directory / "memory.md"
    env = data.get("env", {})
    md.write_text("\n".join([f"# Training-step memory, {ESTIMATE_LABEL}", "",
                             f"- command: `{env.get('command')}`", f"- torch: `{env.get('torch')}`",
                             f"- git commit: `{env.get('git_commit')}`", f"- date (UTC): `{env.get('date_utc')}`",
                             f"- machine: `{env.get('device')}`", ""] + estimates_markdown(data)
                            + _options_section(data)) + "\n")
    return md, plot_estimates(data, directory / "memory.png")


def memory_section(root: Path = RESULTS) -> str:
    data = load_estimates(root)
    lines = [MEM_BEGIN, "", "### Training-step memory at the papers' sizes (estimated)", ""]
    if data is None:
        lines += [f"No estimates are committed yet: run `pytest benchmarks/bench_e2e.py --benchmark-only -k estimated`, "
                  f"then `{REGENERATE}`.", "", MEM_END]
        return "\n".join(lines)
    lines += [f"**{ESTIMATE_LABEL[0].upper() + ESTIMATE_LABEL[1:]}.** Generated by `{REGENERATE}` from "
              f"`benchmarks/results/{ESTIMATE_DIR}/{ESTIMATE_FILE}`, which "
              "`pytest benchmarks/bench_e2e.py --benchmark-only -k estimated` writes (`vpeft estimate` gives one "
              "case's full breakdown). Peak allocated bytes of one full training step (forward, backward, AdamW "
              "step, `zero_grad(set_to_none=True)`; the second of two steps, so AdamW state is live) in bf16 at 8 "
              "frames, 224 px, batch 32 (B/16) or 16 (L/14, E/14), counted exactly by `vpeft.memory` on fake "
              "tensors: every storage an aten op returns, rounded to the CUDA allocator's 512-byte blocks. "
              "Emulated CUDA choices: flash / memory-efficient SDPA, fused dropout, AdamW foreach; 'fused' runs the "
              "Triton kernels and the compiled ladder through their fake implementations (their internal "
              "temporaries are not counted). Not seen: allocator caching and fragmentation (reserved > "
              "allocated), cuBLAS/cuDNN/flash workspaces, the CUDA context (~0.5 GB). The papers' column is "
              "METHODS.md section 4 (A100, SSv2; it does not say which ST-Adapter preset). GB = 10^9 bytes.", "",
              f"![estimated training-step memory](benchmarks/results/{ESTIMATE_DIR}/memory.png)", ""]
    lines += estimates_markdown(data, root) + _options_section(data) + ["", MEM_END]
    return "\n".join(lines)


def _replace_section(text: str, begin: str, end: str, section: str) -> str:
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + section + tail
    return text.rstrip("\n") + "\n\n" + section + "\n"


def update_readme(section: str, readme: Path = README, memory: Optional[str] = None) -> None:
    text = _replace_section(readme.read_text(), BEGIN, END, section)
    if memory is not None:
        text = _replace_section(text, MEM_BEGIN, MEM_END, memory)
    readme.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="write the section into README.md")
    ap.add_argument("--device", help="rewrite e2e.md and e2e.png of this results directory (e.g. cpu)")
    ap.add_argument("--write", action="store_true", help="with --device: write the files")
    ap.add_argument("--root", default=str(RESULTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)
    if args.device:
        data = load(args.device, root)
        if data is None:
            print(f"no {FILE} under {root / args.device}", file=sys.stderr)
            return 1
        if args.write:
            for p in write_device(data, root / args.device):
                print(f"wrote {p}")
        else:
            print(device_markdown(data))
        return 0
    section = readme_section(root)
    mem = memory_section(root)
    print(mem + "\n\n" + section)
    if args.readme:
        data = load_estimates(root)
        if data is not None:
            write_estimates(data, root / ESTIMATE_DIR)
        update_readme(section, memory=mem)
        print(f"\nwrote the section into {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
