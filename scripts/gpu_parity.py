#!/usr/bin/env python3
"""Numerical parity of a `distillery` build on a device (`--device cuda`) against the committed
references that timm / transformers wrote (tests/fixtures/refs, scripts/gen_fixtures.py): every
hidden state of every ViT family at up- and down-sampled sizes, and every stage, the pooled
features and the logits of each CNN student. `cargo test` checks the same references on the CPU;
this runs the CUDA build's kernels on them (no torch needed, numpy + safetensors).

    python3 scripts/gpu_parity.py --bin target/release/distillery --device cuda [--tol 1e-4]

Prints one line per reference (the largest relative error over its tensors, ||a-b|| / ||b||)
and exits non-zero when any exceeds --tol or a run fails.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

# (model folder, reference file): ViT families at other sizes than their checkpoint's, CNNs
CASES = [
    ("vit", "vit-up"), ("vit", "vit-down"),
    ("timm-vit", "timm-vit-up"), ("timm-vit", "timm-vit-down"),
    ("timm-vit-reg", "timm-vit-reg-native"), ("timm-vit-reg", "timm-vit-reg-up"),
    ("vit-mlp96", "vit-mlp96-native"),
    ("dinov2", "dinov2-up"), ("dinov2", "dinov2-down"),
    ("dinov2-swiglu", "dinov2-swiglu-up"),
    ("dinov2-registers", "dinov2-registers-up"), ("dinov2-registers", "dinov2-registers-down"),
    ("clip", "clip-up"), ("clip", "clip-down"),
    ("siglip", "siglip-up"), ("siglip", "siglip-down"),
    ("sam", "sam-up"), ("sam", "sam-down"), ("sam", "sam-native"),
    ("timm-resnet-basic", "timm-resnet-basic"),
    ("timm-resnet-bottleneck", "timm-resnet-bottleneck"),
    ("timm-fastvit-t8", "timm-fastvit-t8"), ("timm-fastvit-t8-fused", "timm-fastvit-t8-fused"),
    ("timm-fastvit-sa12", "timm-fastvit-sa12"), ("timm-fastvit-sa12-fused", "timm-fastvit-sa12-fused"),
    ("timm-mobilevitv2-050", "timm-mobilevitv2-050"), ("timm-mobilevitv2-075", "timm-mobilevitv2-075"),
]


def rel_err(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "distillery"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for model, ref in CASES:
            ref_path = os.path.join(FIX, "refs", ref + ".safetensors")
            out = os.path.join(tmp, ref + ".safetensors")
            cmd = [a.bin, "features", "--model", os.path.join(FIX, "models", model), "--pixels", ref_path,
                   "--out", out, "--device", a.device]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"FAIL {ref}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
                failed += 1
                continue
            want, got = load_file(ref_path), load_file(out)
            keys = [k for k in want if k != "pixel_values" and not k.startswith(("train.", "grad."))]
            missing = [k for k in keys if k not in got]
            errs = {k: rel_err(got[k], want[k]) for k in keys if k in got and got[k].shape == want[k].shape}
            bad_shape = [k for k in keys if k in got and got[k].shape != want[k].shape]
            worst = max(errs.items(), key=lambda kv: kv[1]) if errs else ("-", float("nan"))
            ok = not missing and not bad_shape and errs and worst[1] <= a.tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {ref:<28} {len(errs):>2} tensors, max rel err {worst[1]:.2e} ({worst[0]})"
                  + (f" missing {missing}" if missing else "") + (f" shape differs {bad_shape}" if bad_shape else ""))
    print(f"{len(CASES) - failed}/{len(CASES)} references within {a.tol} on {a.device}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
