"""Sweep open_clip.list_models() x vpeft's methods on the meta device (no weights, no memory).

Each (model, method) pair either adapts and runs a forward pass on a meta clip
(``ok``), is refused with vpeft's one clear error (``refused``), or fails any other
way (``crash``). Run as a script to print the counts by family::

    PYTHONPATH=. python tests/backbone_sweep.py [--json out.json]

Models whose text tower is a Hugging Face model are swept with their vision tower
alone when ``transformers`` is not installed.
"""
from __future__ import annotations

import collections
import copy
import importlib.util
import json
import sys
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch

METHODS = ("linear_probe", "full_finetune", "st_adapter", "msta", "side4video")


def family(name: str) -> str:
    """A coarse family label of an open_clip model name, for the report."""
    n = name.lower()
    for key, label in (("siglip", "SigLIP/SigLIP2"), ("pe-core", "PE-Core"), ("clipa", "CLIPA"), ("coca", "CoCa"),
                       ("mobileclip", "MobileCLIP"), ("eva", "EVA"), ("convnext", "ConvNeXt"), ("rn", "ResNet"),
                       ("vitamin", "ViTamin"), ("swin", "Swin"), ("vit_", "timm ViT"),
                       ("roberta", "HF-text ViT"), ("mt5", "HF-text ViT"), ("nllb", "HF-text ViT")):
        if (key == "rn" and n.startswith("rn")) or (key != "rn" and key in n):
            return label
    return "native ViT"


def build_meta(name: str):
    """open_clip model ``name`` on the meta device (its vision tower alone if its text needs transformers)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = dict(open_clip.get_model_config(name))
    prev = torch.get_default_dtype()
    with torch.device("meta"):
        hf = "hf_model_name" in cfg.get("text_cfg", {})
        if hf and importlib.util.find_spec("transformers") is None:
            return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                                       quick_gelu=cfg.get("quick_gelu", False)).eval()
        custom = cfg.pop("custom_text", False)
        cls = open_clip.CoCa if "multimodal_cfg" in cfg else (open_clip.CustomTextCLIP if custom or hf
                                                              else open_clip.CLIP)
        m = cls(**cfg)
    torch.set_default_dtype(prev)
    return m.eval()


def _options(method: str, model) -> dict:
    """MSTA's ``r`` must divide the vision width (a user's choice, not a default); other
    options are the methods' defaults."""
    if method != "msta":
        return {}
    from vpeft.backbones.towers import vision_tower
    try:
        width = vision_tower(model).width
    except Exception:  # noqa: BLE001 - the adapt call below reports it
        return {}
    return {"bottleneck": next((r for r in (128, 64, 32, 16, 8) if width % r == 0), 128)}


def run_pair(model, method: str, refusal: Tuple[type, ...]) -> Tuple[str, str]:
    """``(outcome, detail)`` of adapting ``model`` (consumed) with ``method`` and one meta forward."""
    import vpeft

    try:
        vm = vpeft.adapt(model, method, num_frames=2, num_classes=4, **_options(method, model))
    except refusal as e:
        return "refused", str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - what the sweep counts
        return "crash", f"adapt: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    try:
        h, w = vm.tower.image_size
        with torch.no_grad():
            out = vm(torch.empty(1, 2, 3, h, w, device="meta"))
        if tuple(out.shape) != (1, 4):
            return "crash", f"forward: logits of shape {tuple(out.shape)}"
    except Exception as e:  # noqa: BLE001
        return "crash", f"forward: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return "ok", ""


def sweep(names: Iterable[str], methods: Iterable[str] = METHODS, refusal: Optional[Tuple[type, ...]] = None,
          progress: bool = False) -> List[dict]:
    """One record per (name, method): name, family, method, outcome, detail."""
    if refusal is None:
        try:
            from vpeft.backbones.towers import UnsupportedBackbone
            refusal = (UnsupportedBackbone,)
        except ImportError:  # an older vpeft: any ValueError at adapt time counts as a refusal
            refusal = (ValueError,)
    rows = []
    methods = tuple(methods)
    for i, name in enumerate(names):
        try:
            base = build_meta(name)
        except Exception as e:  # noqa: BLE001
            rows += [dict(name=name, family=family(name), method=m, outcome="unbuildable",
                          detail=f"{type(e).__name__}: {e}"[:200]) for m in methods]
            continue
        for m in methods:
            outcome, detail = run_pair(copy.deepcopy(base), m, refusal)
            rows.append(dict(name=name, family=family(name), method=m, outcome=outcome, detail=detail))
        if progress:
            print(f"[{i + 1}] {name}: " + " ".join(f"{r['method']}={r['outcome']}" for r in rows[-len(methods):]),
                  file=sys.stderr, flush=True)
    return rows


def counts(rows: List[dict]) -> Dict[str, Dict[str, int]]:
    """``{family: {outcome: pairs}}`` plus a ``"total"`` row."""
    out: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
    for r in rows:
        out[r["family"]][r["outcome"]] += 1
        out["total"][r["outcome"]] += 1
    return {k: dict(v) for k, v in out.items()}


def main(argv=None) -> int:
    import argparse
    import open_clip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every record here")
    ap.add_argument("names", nargs="*", help="open_clip names (default: all)")
    a = ap.parse_args(argv)
    t0 = time.time()
    rows = sweep(a.names or open_clip.list_models(), progress=True)
    for fam, c in sorted(counts(rows).items(), key=lambda kv: kv[0] == "total"):
        print(f"{fam:16s} " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    print(f"{len(rows)} pairs in {time.time() - t0:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
