#!/usr/bin/env python3
"""PyTorch eager reference for `distillery bench`: a ViT-B/16 (transformers ViTModel, random
weights) forward at 224 px, batch 8, on CPU (or `--device cuda`, `--dtype bf16`); or, with `--timm NAME`, any timm model's eval
forward (`distillery bench --model NAME`), or with `--train` one training step of it (train-mode
forward, cross-entropy on random labels over 1000 classes, backward, AdamW;
`distillery bench --task train-step --model NAME`). Run by hand in the same session as
`distillery bench`, alternating, and compare the medians.

    .refenv/bin/python scripts/bench_torch.py [--attn sdpa|eager] [--iters 5]
    .refenv/bin/python scripts/bench_torch.py --timm mobilevitv2_100 --image 256 --batch 32 [--train]
    python3 scripts/bench_torch.py --device cuda [--dtype bf16] --batch 64

On a GPU every timed call ends with a device synchronisation, as `distillery bench` reads a value
back; float32 matrix products stay in full float32 (no TF32), as candle's default.
"""
import argparse
import json
import statistics
import time

import torch
import transformers as T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--timm", default=None, help="a timm model name (random init)")
    ap.add_argument("--train", action="store_true", help="time a training step (with --timm)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"],
                    help="weights and activations of an inference forward (training stays f32)")
    a = ap.parse_args()
    a.torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if a.timm:
        return timm_bench(a)
    cfg = T.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=a.image, patch_size=16)
    cfg._attn_implementation = a.attn
    m = T.ViTModel(cfg, add_pooling_layer=False).eval().to(a.device, a.torch_dtype)
    x = torch.randn(a.batch, 3, a.image, a.image, device=a.device, dtype=a.torch_dtype)
    times = []
    with torch.inference_mode():
        for _ in range(a.warmup):
            m(pixel_values=x)
        sync(a.device)
        for _ in range(a.iters):
            t0 = time.perf_counter()
            m(pixel_values=x)
            sync(a.device)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"framework": f"torch {torch.__version__}", "attn": a.attn, "threads": torch.get_num_threads(),
                      "device": a.device, "dtype": a.dtype,
                      "batch": a.batch, "image": a.image, "median_s": med, "min_s": min(times),
                      "mean_s": sum(times) / len(times), "images_per_s": a.batch / med}))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timm_bench(a):
    import timm
    m = timm.create_model(a.timm, pretrained=False, num_classes=1000).to(a.device)
    if a.train:
        x = torch.randn(a.batch, 3, a.image, a.image, device=a.device)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
        y = torch.randint(0, 1000, (a.batch,), device=a.device)

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    else:
        m = m.to(dtype=a.torch_dtype).eval()
        x = torch.randn(a.batch, 3, a.image, a.image, device=a.device, dtype=a.torch_dtype)

        def run():
            with torch.inference_mode():
                m(x)
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        run()
        sync(a.device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"framework": f"torch {torch.__version__} timm {timm.__version__}", "model": a.timm,
                      "train": a.train, "threads": torch.get_num_threads(),
                      "device": a.device, "dtype": "f32" if a.train else a.dtype, "batch": a.batch, "image": a.image,
                      "median_s": med, "min_s": min(times), "images_per_s": a.batch / med}))


if __name__ == "__main__":
    main()
