"""Every open_clip architecture x every method: it adapts (and a meta-device forward gives
logits of the right shape), or vpeft refuses it with its one clear error; nothing else.

The full sweep (144 names x 5 methods, about 10 min on one loaded CPU core) runs with
``VPEFT_FULL_SWEEP=1``; by default one representative name per family runs.
"""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backbone_sweep import counts, sweep  # noqa: E402

REPRESENTATIVE = ["ViT-S-32", "ViT-B-32-SigLIP2-256", "PE-Core-T-16-384", "EVA02-B-16", "MobileCLIP-B",
                  "coca_ViT-B-32", "RN50", "convnext_tiny", "MobileCLIP-S1", "ViTamin-S",
                  "vit_relpos_medium_patch16_cls_224", "nllb-clip-base"]
SUPPORTED = {"native ViT", "SigLIP/SigLIP2", "PE-Core", "CLIPA", "CoCa", "EVA", "timm ViT", "ViTamin",
             "HF-text ViT"}


def _check(rows):
    print()
    for fam, c in sorted(counts(rows).items()):
        print(f"  {fam:16s} " + "  ".join(f"{k}={v}" for k, v in sorted(c.items())))
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    assert not bad, bad[:5]
    for r in rows:
        if r["outcome"] == "refused":
            assert r["detail"].startswith("vpeft cannot adapt ") and "Supported vision tower families" in r["detail"], r
    return rows


def test_representative_architectures_adapt_or_are_refused_clearly():
    rows = _check(sweep(REPRESENTATIVE))
    ok = {r["name"] for r in rows if r["outcome"] == "ok"}
    # every ViT-style family is accepted with every method; the convolutional ones are refused
    assert {"ViT-S-32", "ViT-B-32-SigLIP2-256", "PE-Core-T-16-384", "EVA02-B-16", "MobileCLIP-B", "coca_ViT-B-32",
            "ViTamin-S", "nllb-clip-base"} <= ok
    assert all(r["outcome"] == "ok" for r in rows if r["name"] in ok)
    assert not ok & {"RN50", "convnext_tiny", "MobileCLIP-S1", "vit_relpos_medium_patch16_cls_224"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VPEFT_FULL_SWEEP") != "1", reason="full 720-pair sweep: set VPEFT_FULL_SWEEP=1")
def test_every_open_clip_architecture_adapts_or_is_refused_clearly():
    import open_clip

    t0 = time.time()
    rows = _check(sweep(open_clip.list_models()))
    print(f"  {len(rows)} pairs in {time.time() - t0:.0f} s")
    for r in rows:
        if r["family"] in SUPPORTED and r["name"] not in ("vit_relpos_medium_patch16_cls_224",):
            assert r["outcome"] == "ok", r
