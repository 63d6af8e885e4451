#!/usr/bin/env python3
"""PyTorch eager counterpart of `distillery bench --task stage1-step`: one SAK stage-1 training
step of a ViT-S/16 student (timm, final norm unused) with one adapter path per teacher
(13 Houlsby adapters, LayerNorm + aligner per level) and N ViT-B/16 teachers (transformers
ViTModel, random weights, no_grad), loss 0.9(1-cos) + 0.1 SmoothL1 per (teacher, level),
backward and AdamW. Run by hand in the same session as the Rust benchmark.

    .refenv/bin/python scripts/bench_torch_stage1.py [--teachers 3] [--iters 3] [--cached] [--device cuda]

The JSON line has the median of each phase (teachers, student forward, loss, backward,
optimizer) as `distillery bench --task stage1-step --breakdown` prints them; --cached computes
the teachers' features once and reuses them (the cached path's step). On a GPU each phase ends
with a device synchronisation (as the Rust benchmark's) and float32 products stay full float32.
"""
import argparse
import json
import resource
import statistics
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T


class Adapter(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.down, self.up = nn.Linear(d, d // 4), nn.Linear(d // 4, d)
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x + self.s * self.up(F.gelu(self.down(x)))


class Student(nn.Module):
    def __init__(self, n_teachers, t_dim, levels=(2, 5, 8, 11)):
        super().__init__()
        self.vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
        d, depth = self.vit.embed_dim, len(self.vit.blocks)
        self.levels = levels
        self.paths = nn.ModuleList(nn.ModuleList(Adapter(d) for _ in range(depth + 1)) for _ in range(n_teachers))
        self.norms = nn.ModuleList(nn.ModuleList(nn.LayerNorm(d) for _ in levels) for _ in range(n_teachers))
        self.aligners = nn.ModuleList(nn.ModuleList(nn.Linear(d, t_dim) for _ in levels) for _ in range(n_teachers))

    def forward(self, x):
        v = self.vit
        h = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        xs = [h]
        for blk in v.blocks:
            h = blk(h)
            xs.append(h)
        outs = []
        for p, norms, aligners in zip(self.paths, self.norms, self.aligners):
            r = [p[0](xs[0])]
            for l in range(1, len(xs)):
                r.append(p[l](r[-1] + xs[l]))
            outs.append([al(n(r[b + 1][:, 1:])) for b, n, al in zip(self.levels, norms, aligners)])
        return outs


def term(s, t):
    b = s.shape[0]
    cos = F.cosine_similarity(s.reshape(b, -1), t.reshape(b, -1), dim=1).mean()
    return 0.9 * (1 - cos) + 0.1 * F.smooth_l1_loss(s, t, beta=1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cached", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = a.device

    def now():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    cfg = T.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      image_size=a.image, patch_size=16)
    teachers = [T.ViTModel(cfg, add_pooling_layer=False).eval().to(dev) for _ in range(a.teachers)]
    student = Student(a.teachers, 768).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.randn(a.batch, 3, a.image, a.image, device=dev)
    phases = ["teachers", "student forward", "loss", "backward", "optimizer"]
    times, per_phase = [], {p: [] for p in phases}

    def teacher_feats():
        with torch.no_grad():
            return [[o.hidden_states[b + 1][:, 1:] for b in (2, 5, 8, 11)]
                    for o in (t(pixel_values=x, output_hidden_states=True) for t in teachers)]

    cached = teacher_feats() if a.cached else None
    for i in range(a.warmup + a.iters):
        t0 = now()
        feats = cached if a.cached else teacher_feats()
        marks = [now()]
        outs = student(x)
        marks.append(now())
        loss = sum(term(s, t) for so, to in zip(outs, feats) for s, t in zip(so, to))
        marks.append(now())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(now())
        opt.step()
        marks.append(now())
        if i >= a.warmup:
            times.append(now() - t0)
            for p, m0, m1 in zip(phases, [t0] + marks, marks):
                per_phase[p].append(m1 - m0)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.startswith("cuda") else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                      "teachers": a.teachers, "batch": a.batch, "image": a.image,
                      "cached": a.cached, "median_s": statistics.median(times), "min_s": min(times),
                      "phases": {p: statistics.median(v) for p, v in per_phase.items()},
                      "peak_rss_mib": peak, "device": dev, "gpu_peak_mib": gpu_peak}))


if __name__ == "__main__":
    main()
