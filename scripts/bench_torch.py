#!/usr/bin/env python3
"""PyTorch eager reference for `distillery bench`: a ViT-B/16 (transformers ViTModel, random
weights) forward at 224 px, batch 8, on CPU; or, with `--timm NAME`, any timm model's eval
forward (`distillery bench --model NAME`), or with `--train` one training step of it (train-mode
forward, cross-entropy on random labels over 1000 classes, backward, AdamW;
`distillery bench --task train-step --model NAME`). Run by hand in the same session as
`distillery bench`, alternating, and compare the medians.

    .refenv/bin/python scripts/bench_torch.py [--attn sdpa|eager] [--iters 5]
    .refenv/bin/python scripts/bench_torch.py --timm mobilevitv2_100 --image 256 --batch 32 [--train]
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
    a = ap.parse_args()
    if a.timm:
        return timm_bench(a)
    cfg = T.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=a.image, patch_size=16)
    cfg._attn_implementation = a.attn
    m = T.ViTModel(cfg, add_pooling_layer=False).eval()
    x = torch.randn(a.batch, 3, a.image, a.image)
    times = []
    with torch.inference_mode():
        for _ in range(a.warmup):
            m(pixel_values=x)
        for _ in range(a.iters):
            t0 = time.perf_counter()
            m(pixel_values=x)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"framework": f"torch {torch.__version__}", "attn": a.attn, "threads": torch.get_num_threads(),
                      "batch": a.batch, "image": a.image, "median_s": med, "min_s": min(times),
                      "mean_s": sum(times) / len(times), "images_per_s": a.batch / med}))


def timm_bench(a):
    import timm
    m = timm.create_model(a.timm, pretrained=False, num_classes=1000)
    x = torch.randn(a.batch, 3, a.image, a.image)
    if a.train:
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
        y = torch.randint(0, 1000, (a.batch,))

        def run():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    else:
        m.eval()

        def run():
            with torch.inference_mode():
                m(x)
    times = []
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        run()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"framework": f"torch {torch.__version__} timm {timm.__version__}", "model": a.timm,
                      "train": a.train, "threads": torch.get_num_threads(), "batch": a.batch, "image": a.image,
                      "median_s": med, "min_s": min(times), "images_per_s": a.batch / med}))


if __name__ == "__main__":
    main()
