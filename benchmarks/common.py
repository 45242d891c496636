"""Helpers any benchmark can use: which machine this is, library versions, where results go,
and merging records into a results JSON file.

Results live under ``benchmarks/results/<device>/`` where ``<device>`` is the GPU name
with runs of other characters than ``A-Za-z0-9._-`` replaced by ``-``
(``NVIDIA-H100-80GB-HBM3``, as ``bench_token_shift_attention.py`` names it) or ``cpu``. CPU results are labelled as such
everywhere they are written.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The GPU's name, or ``CPU (<model>, <n> threads)`` when there is no CUDA device."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"


def device_slug() -> str:
    """Directory name of this machine's results: the slugged GPU name, or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", torch.cuda.get_device_name()).strip("-")


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(command: str) -> Dict[str, object]:
    """Metadata recorded with every result: device, versions, command, commit, time."""
    env: Dict[str, object] = {
        "device": device_name(),
        "device_type": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "triton": _version("triton"),
        "open_clip_torch": _version("open_clip_torch"),
        "timm": _version("timm"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "python": platform.python_version(),
        "command": command,
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "VPEFT_BACKEND": os.environ.get("VPEFT_BACKEND"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import vpeft_kernels

        env["vpeft_backends"] = vpeft_kernels.backend_status()
    except Exception as exc:  # noqa: BLE001 - metadata must not break a run
        env["vpeft_backends"] = f"unavailable: {exc}"
    return env


def results_dir(slug: Optional[str] = None, root: Path = RESULTS) -> Path:
    path = Path(root) / (slug or device_slug())
    path.mkdir(parents=True, exist_ok=True)
    return path


def merge_records(path: Path, new: Iterable[dict], key: Callable[[dict], tuple], header: dict) -> dict:
    """Merge ``new`` records into the JSON file at ``path`` (replacing records with the same
    key, keeping the others, e.g. from an earlier run of a subset), write it, return it."""
    path = Path(path)
    data = {"records": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"records": []}
    by_key: Dict[tuple, dict] = {key(r): r for r in data.get("records", [])}
    for r in new:
        by_key[key(r)] = r
    out = dict(header)
    out["records"] = sorted(by_key.values(), key=key)
    path.write_text(json.dumps(out, indent=1, sort_keys=False, default=str) + "\n")
    return out


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)


__all__ = ["RESULTS", "device_name", "device_slug", "environment", "results_dir", "merge_records",
           "git_commit", "cpu_name", "command_line"]
