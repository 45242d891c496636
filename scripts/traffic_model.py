"""HBM traffic MODEL (an estimate, not a measurement) of the fused kernels as they are
now, at the ViT-B/16 shapes of issue 16: M = 256*197 = 50,432 token rows, D = 768,
ST-Adapter r = 384, MSTA r = 128, side width d = 320 (5 heads), N = 196, bf16; the
ladder projection with L = 12 levels (D -> d), frozen z (a byte-count model of the
ATen / cuBLAS calls and kernels of csrc/ladder_flow.cpp, same rules).

    python scripts/traffic_model.py            # table (Markdown) on stdout
    python scripts/traffic_model.py --json F   # also the per-launch lists as JSON

Rules of the model: every launch reads each input tensor it touches once from HBM and
writes each output once (the GROUP_M tile order is what makes a (rows, K) input tile
an L2 hit for the other column tiles of its group; the temporal neighbour rows +-197
rows away are counted as L2 hits too -- the upper bound if they were not is printed
beside, and so are the MSTA backward's re-reads of its u/dy row tiles for its second
column block of r); weights and the per-tile fp32 partial sums are counted (they are small);
cuBLAS weight-gradient GEMMs read both operands once and write the fp32 result. The
roofline time divides by 4.8 TB/s (H200 datasheet) and 3.35 TB/s (H100).
The issue's measured/estimated columns are copied for comparison.
"""
from __future__ import annotations

import argparse
import json

B2 = 2  # bf16 bytes
F4 = 4
M, D, R_ST, R_MSTA = 256 * 197, 768, 384, 128
FR, N, DS, HEADS = 256, 196, 320, 5


def mb(x):
    return x / 1e6


def total(launches):
    return sum(r + w for _, r, w in launches)


def st_fwd():
    x, h = M * D * B2, M * R_ST * B2
    w = 2 * R_ST * D * B2
    return [("h = x Wd^T + bd", x + w / 2, h),
            ("y = x + taps(h) Wu^T + bu", h + x + w / 2, x)]


def st_bwd():
    x, h = M * D * B2, M * R_ST * B2
    wt = R_ST * D * B2
    return [("recompute h", x + wt, h),
            ("dg = dy Wu (+ patch colsum of dy)", x + wt, h),
            ("taps bwd: g, dh, tap/bias partials", 2 * h, 2 * h),
            ("dWu = dy^T g (cuBLAS, fp32 out)", x + h, R_ST * D * F4),
            ("dWd = dh^T x (cuBLAS, fp32 out)", h + x, R_ST * D * F4),
            ("dx = dy + dh Wd", h + x + wt, x)]


def msta_fwd():
    u, hd = M * D * B2, M * R_MSTA * B2
    return [("bottleneck: hd (h1 through hd as scratch)", u + R_MSTA * D * B2 + hd, 2 * hd),
            ("out = scale (hd Wu^T + bu + up_t(hd))", hd + R_MSTA * D * B2, u)]


def msta_bwd():
    u, hd = M * D * B2, M * R_MSTA * B2
    part = (M // 64) * (2 * D + 2 * R_MSTA) * F4
    # u and dy once each from HBM; the program's own h1, hd and dz2 (tap sums, then dz2)
    # read back once each. At r=128 the backward walks r in two 64-wide column blocks: the
    # second re-reads the u and dy row tiles the first just read (L2; MSTA_REREAD if not)
    return [("bottleneck bwd: hd, h1, dz2, dz1 (+ bias partials)", 2 * u + 3 * hd, 4 * hd + part),
            ("grouped temporal tap grads", u + hd, (M // 32) * 3 * D * F4),
            ("dWu = dy^T hd", u + hd, D * R_MSTA * F4),
            ("dWs = dz2^T h1", 2 * hd, R_MSTA * R_MSTA * F4),
            ("dWd = dz1^T u", hd + u, D * R_MSTA * F4),
            ("du = scale dz1 Wd", hd, u)]


def tsa_fwd():
    s = FR * N * DS * B2
    qkv, lse = 3 * s, FR * HEADS * N * F4
    return [("s + pos", s, s), ("LayerNorm", s, s), ("qkv = xs Wqkv^T", s, qkv),
            ("[CLS] shift, LN, kv_cls (F rows)", 0, 0),
            ("attention core (fused)", qkv, s + lse), ("out = o Wo^T", s, s)]


def tsa_bwd():
    s = FR * N * DS * B2
    qkv, lse = 3 * s, FR * HEADS * N * F4
    scratch = FR * HEADS * N * (DS // HEADS) * F4  # fp32 dQ, L2-resident per head in practice
    return [("dWo = g^T o, do = g Wo", 2 * s + s, s), ("attention bwd (one kernel)", qkv + 2 * s + lse,
                                                       qkv + 2 * scratch),
            ("recompute s + pos, LN", 2 * s, 2 * s), ("dWqkv = dqkv^T xs", qkv + s, 0),
            ("dxs = dqkv Wqkv", qkv, s), ("LayerNorm bwd", 3 * s, s)]


# ---- ladder projection (csrc/, backend "extension"), pre norm unless named, frozen z ----
# (Side4Video: no gradient into the backbone levels). L = 12 levels, d = DS = 320.
LV = 12
Z_LAD, Y_LAD = LV * M * D * B2, LV * M * DS * B2   # one (L, M, D) / (L, M, d) bf16 tensor
W_EL = LV * DS * D                                  # elements of W (L, d, D)
STATS = 2 * LV * M * F4                             # mean, rstd (L, M) fp32
COLS = LV * -(-M // 256) * DS * F4                  # one fp32 column partial per 256-row chunk


def ladder_pre_fwd():
    return [("LayerNorm statistics (fp32, one pass)", Z_LAD, STATS),
            # ATen ops over W: to fp32, * gamma, row mean, subtract, to bf16, row sums, W beta
            ("folded weights Wc, s', c (ATen, fp32)", W_EL * 24, W_EL * 14),
            ("out = z Wc^T (GEMM, no bias operand)", Z_LAD + W_EL * B2, Y_LAD),
            ("epilogue rstd (out - mean s') + c, in place", Y_LAD + STATS, Y_LAD)]


def ladder_pre_bwd():
    return [("G = rstd g; column sums of g, mean G", Y_LAD + STATS, Y_LAD + 2 * COLS),
            ("sum of the chunk partials", 2 * COLS, 0),
            ("H = G^T z (GEMM per level, fp32 out)", Y_LAD + Z_LAD, W_EL * F4),
            # W to fp32, rank-2 terms (bmm), addcmul, cast, W * H summed over d (ATen, fp32)
            ("dW, dgamma, dbeta from H (ATen, fp32)", W_EL * 24, W_EL * 18)]


def ladder_post_fwd():
    return [("y = z W^T + b (addmm per level)", Z_LAD + W_EL * B2, Y_LAD),
            ("LayerNorm over d, in place", Y_LAD, Y_LAD + STATS)]


def ladder_post_bwd():
    return [("recompute y (addmm per level)", Z_LAD + W_EL * B2, Y_LAD),
            ("one pass: dy over y, dgamma/dbeta/db sums", 2 * Y_LAD + STATS, Y_LAD + 3 * COLS),
            ("dW = dy^T z (GEMM)", Y_LAD + Z_LAD, W_EL * B2)]


def ladder_pre_fwd_before():  # csrc as reviewed in issue 16, by the same rules
    return [("LayerNorm writes xn (L, M, D)", Z_LAD, Z_LAD + STATS),
            ("baddbmm: expanded bias copied into out", 0, Y_LAD),
            ("baddbmm: out += xn W^T", Z_LAD + Y_LAD, Y_LAD)]


def ladder_pre_bwd_before():
    return [("recompute xhat (L, M, D)", Z_LAD + STATS, Z_LAD),
            ("H = g^T xhat (bmm, bf16 out)", Y_LAD + Z_LAD, W_EL * B2),
            ("gsum = sum_m g", Y_LAD, 0)]


LADDER_OPS = {"ladder B/16 pre fwd": ladder_pre_fwd, "ladder B/16 pre bwd": ladder_pre_bwd,
              "ladder B/16 post fwd": ladder_post_fwd, "ladder B/16 post bwd": ladder_post_bwd}
LADDER_BEFORE = {"ladder B/16 pre fwd": ladder_pre_fwd_before, "ladder B/16 pre bwd": ladder_pre_bwd_before}


ISSUE = {  # op: (ideal, as written before, eager, inductor) in MB, from the issue's table
    "ST-Adapter fwd": ("155", "658", "1548", "1031"), "ST-Adapter bwd": ("232", "1317", "2538", "1271"),
    "MSTA fwd": ("155", "181", "2351", "1090"), "MSTA bwd": ("232", "504", "3895", "1273"),
    "token-shift attention fwd": ("", "", "", ""), "token-shift attention bwd": ("", "", "", ""),
    "ladder B/16 pre fwd": ("", "3950", "3960", ""), "ladder B/16 pre bwd": ("", "3570", "5170", ""),
    "ladder B/16 post fwd": ("", "", "", ""), "ladder B/16 post bwd": ("", "", "", ""),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="HBM traffic model (estimate) of the fused kernels at B/16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ops = {"ST-Adapter fwd": st_fwd(), "ST-Adapter bwd": st_bwd(), "MSTA fwd": msta_fwd(),
           "MSTA bwd": msta_bwd(), "token-shift attention fwd": tsa_fwd(),
           "token-shift attention bwd": tsa_bwd()}
    ops.update({name: f() for name, f in LADDER_OPS.items()})
    h_nb = 2 * M * R_ST * B2  # ST: the two neighbour reads of h, if they all missed L2
    msta_reread = 2 * M * D * B2  # MSTA bwd: the second column block's u and dy, if they missed L2
    print("HBM traffic MODEL (estimate; see the docstring for the rules), B/16, bf16\n")
    print("| op | model, new kernels (MB) | roofline H200 / H100 (ms) | issue: ideal | issue: fused before "
          "| issue: eager | issue: Inductor |")
    print("|---|---|---|---|---|---|---|")
    for name, launches in ops.items():
        t = total(launches)
        extra = {"ST-Adapter fwd": f" (+{mb(h_nb):.0f} if neighbour rows miss L2)",
                 "MSTA bwd": f" (+{mb(msta_reread):.0f} if the second column block's u/dy reads miss L2)"}.get(name, "")
        i = ISSUE[name]
        print(f"| {name} | {mb(t):.0f}{extra} | {t / 4.8e12 * 1e3:.3f} / {t / 3.35e12 * 1e3:.3f} | {i[0]} | "
              f"{i[1]} | {i[2]} | {i[3]} |")
    print("\nLaunches (read MB / write MB):")
    for name, launches in ops.items():
        print(f"  {name}:")
        for what, r, w in launches:
            print(f"    {what:<52} {mb(r):8.1f} {mb(w):8.1f}")
    before = {name: f() for name, f in LADDER_BEFORE.items()}
    print("\nLadder as reviewed in issue 16 (csrc before the fold), same rules (read MB / write MB):")
    for name, launches in before.items():
        print(f"  {name}: {mb(total(launches)):.0f} MB")
        for what, r, w in launches:
            print(f"    {what:<52} {mb(r):8.1f} {mb(w):8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            doc = {k: [{"launch": a, "read_bytes": r, "write_bytes": w} for a, r, w in v] for k, v in ops.items()}
            doc.update({k + " (before)": [{"launch": a, "read_bytes": r, "write_bytes": w} for a, r, w in v]
                        for k, v in before.items()})
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
