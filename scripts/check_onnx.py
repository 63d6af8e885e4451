#!/usr/bin/env python3
"""Check a `distillery export` file with ONNX Runtime against distillery's own forward.

    distillery export   --model M --out m.onnx --size H,W
    distillery features --model M --pixels px.safetensors --out ref.safetensors
    python scripts/check_onnx.py m.onnx px.safetensors ref.safetensors [--repeat 20]

`px.safetensors` holds `pixel_values` [B, 3, H, W] (make one with --make-pixels B,H,W). Every
ONNX output is compared with the tensor of the same name in `ref.safetensors` (relative error =
max |a - b| / max |b|); the ONNX checker runs first; ONNX Runtime's median latency is printed.
Needs onnx, onnxruntime, numpy, safetensors (not needed by CI)."""
import argparse
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("onnx_file")
    ap.add_argument("pixels")
    ap.add_argument("reference", nargs="?")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--make-pixels", help="B,H,W: write random pixel_values to PIXELS and exit")
    a = ap.parse_args()
    if a.make_pixels:
        b, h, w = (int(v) for v in a.make_pixels.split(","))
        x = np.random.default_rng(0).standard_normal((b, 3, h, w)).astype(np.float32)
        save_file({"pixel_values": x}, a.pixels)
        return 0
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(a.onnx_file), full_check=True)
    opts = ort.SessionOptions()
    if a.threads:
        opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(a.onnx_file, opts, providers=["CPUExecutionProvider"])
    x = load_file(a.pixels)["pixel_values"]
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    worst = 0.0
    if a.reference:
        ref = load_file(a.reference)
        for n, o in zip(names, outs):
            if n not in ref:
                print(f"  {n}: not in the reference")
                continue
            r = ref[n]
            err = float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-12))
            worst = max(worst, err)
            print(f"  {n} {list(o.shape)}: rel err {err:.2e}")
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        sess.run(None, {sess.get_inputs()[0].name: x})
        times.append(time.perf_counter() - t0)
    print(f"onnxruntime {ort.__version__}: batch {x.shape[0]} median {np.median(times) * 1e3:.2f} ms"
          f" over {a.repeat} runs; worst rel err {worst:.2e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
