#!/usr/bin/env python3
"""Generate reference outputs and tiny data-set folders for distillery's dense-task tests.

Run by hand (never by CI):

    python -m venv .refenv && .refenv/bin/pip install numpy scipy scikit-image \
        opencv-python-headless pillow torch safetensors
    .refenv/bin/python scripts/gen_dense_fixtures.py

Writes under tests/fixtures/dense/:
  thin/<k>-in.png, thin/<k>-out.png
      binary maps and skimage.morphology.thin of them (skimage documents its thin as MATLAB's
      bwmorph 'thin' with n = inf, which the BSDS benchmark uses);
  labelmap/<k>.mat, labelmap/<k>-edge.png
      a PASCAL-Context style LabelMap (saved compressed by scipy) and the boundaries MTI-Net's
      loader derives from it: thin(|cv2.Laplacian(LabelMap, CV_64F)| > 0);
  pascal/   a 3-image PASCAL_MT folder (MTI-Net layout) made from real photos of
            ../shared/fixtures, with semseg (palette PNG), human_parts .mat (PASCAL-Part
            `anno` structs), LabelMap .mat, sal_distill, normals_distill, json class lists,
            and expected.json: the parts map class histogram per image as MTI-Net computes it;
  nyud/     a 2-image NYUD_MT folder with the real NYU sample (depth .npy in metres);
  losses.json  the stage-2 task losses computed with torch on small random inputs;
  decoder.safetensors  MoR routers + heads in torch: weights, inputs, eval/train logits.
"""
import json
import os
import shutil

import cv2
import numpy as np
import scipy.io as sio
from PIL import Image
from skimage.morphology import thin

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "dense")
SHARED = os.path.abspath(os.path.join(ROOT, "..", "shared", "fixtures"))
rng = np.random.default_rng(7)


def save_bin(path, m):
    Image.fromarray((m.astype(np.uint8) * 255)).save(path)


def blobs(h, w, k, thr):
    z = rng.normal(size=(h, w)).astype(np.float32)
    z = cv2.GaussianBlur(z, (0, 0), k)
    return z > thr


def gen_thin():
    d = os.path.join(OUT, "thin")
    os.makedirs(d)
    pb = np.array(Image.open(os.path.join(SHARED, "bsds-bench", "png", "2018.png")).convert("L"))
    cases = [
        pb[60:180, 100:260] >= 0.2 * 255,
        pb[150:300, 200:420] >= 0.5 * 255,
        blobs(60, 80, 3, 0.02),
        blobs(50, 70, 1.5, 0.1),
    ]
    rect = np.zeros((30, 40), bool)
    rect[5:20, 3:35] = True
    rect[10:28, 15:22] = True
    cases.append(rect)
    for k, c in enumerate(cases):
        save_bin(os.path.join(d, f"{k}-in.png"), c)
        save_bin(os.path.join(d, f"{k}-out.png"), thin(c))


def pascal_edges(lm):
    lap = cv2.Laplacian(lm.astype(np.float64), cv2.CV_64F)
    return thin(np.abs(lap) > 0)


def voronoi_labels(h, w, n, labels):
    pts = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], 1)
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    return np.asarray(labels)[d.argmin(-1)]


def gen_labelmaps():
    d = os.path.join(OUT, "labelmap")
    os.makedirs(d)
    for k, (h, w, n) in enumerate([(40, 56, 9), (33, 47, 14)]):
        lm = voronoi_labels(h, w, n, rng.integers(1, 60, n)).astype(np.uint16)
        sio.savemat(os.path.join(d, f"{k}.mat"), {"LabelMap": lm}, do_compression=(k == 0))
        save_bin(os.path.join(d, f"{k}-edge.png"), pascal_edges(lm))


PARTS = ["head", "hair", "torso", "neck", "luarm", "rlarm", "lhand", "ruleg", "llleg", "rfoot"]


def anno_struct(objects):
    """PASCAL-Part `anno` struct: imname, objects(class, class_ind, mask, parts(part_name, mask))."""
    pdt = [("part_name", "O"), ("mask", "O")]
    odt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=odt)
    for i, (cls, ind, mask, parts) in enumerate(objects):
        pa = np.zeros((1, len(parts)), dtype=pdt)
        for j, (name, pm) in enumerate(parts):
            pa[0, j]["part_name"] = name
            pa[0, j]["mask"] = pm.astype(np.uint8)
        objs[0, i]["class"] = cls
        objs[0, i]["class_ind"] = np.array([[ind]], dtype=np.uint8)
        objs[0, i]["mask"] = mask.astype(np.uint8)
        objs[0, i]["parts"] = pa if parts else np.zeros((0, 0))
    a = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    a[0, 0]["imname"] = "x.jpg"
    a[0, 0]["objects"] = objs
    return {"anno": a}


def gen_pascal():
    d = os.path.join(OUT, "pascal")
    for sub in ["JPEGImages", "ImageSets/Context", "semseg/VOC12", "human_parts",
                "pascal-context/trainval", "sal_distill", "normals_distill", "json"]:
        os.makedirs(os.path.join(d, sub))
    srcs = [os.path.join(SHARED, "bsds-bench", "images", f"{i}.jpg") for i in ("2018", "3063", "5096")]
    ids = ["2008_000001", "2008_000002", "2008_000003"]
    json.dump({"unknown": 0, "wall": 3, "floor": 5, "table": 7}, open(os.path.join(d, "json/nyu_classes.json"), "w"))
    json.dump({"wall": 30, "floor": 33, "person": 15, "sky": 44, "table": 7}, open(os.path.join(d, "json/context_classes.json"), "w"))
    expected = {}
    for k, (src, iid) in enumerate(zip(srcs, ids)):
        img = Image.open(src).convert("RGB").resize((96, 64), Image.BILINEAR)
        img.save(os.path.join(d, "JPEGImages", iid + ".jpg"), quality=95)
        h, w = 64, 96
        lm = voronoi_labels(h, w, 8, [30, 33, 15, 44, 7, 30, 15, 44]).astype(np.uint16)
        sio.savemat(os.path.join(d, "pascal-context/trainval", iid + ".mat"), {"LabelMap": lm}, do_compression=True)
        seg = (lm % 21).astype(np.uint8)
        seg[0:3, :] = 255
        p = Image.fromarray(seg, mode="P")
        p.putpalette(list(rng.integers(0, 256, 768).astype(np.uint8)))
        p.save(os.path.join(d, "semseg/VOC12", iid + ".png"))
        Image.fromarray((blobs(h, w, 3, 0.0) * 200 + 20).astype(np.uint8)).save(os.path.join(d, "sal_distill", iid + ".png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(os.path.join(d, "normals_distill", iid + ".png"))
        # Parts: image 0 two people (one without parts) + a dog; image 1 only a dog; image 2 none file.
        parts_hist = None
        if k == 0:
            person = np.zeros((h, w), bool)
            person[10:60, 10:40] = True
            parts = []
            for j, name in enumerate(PARTS):
                m = np.zeros((h, w), bool)
                m[10 + 5 * j:15 + 5 * j, 10:40] = True
                parts.append((name, m))
            p2 = np.zeros((h, w), bool)
            p2[5:20, 50:90] = True
            dog = np.zeros((h, w), bool)
            dog[40:60, 60:90] = True
            objs = [("person", 15, person, parts), ("person", 15, p2, []),
                    ("dog", 12, dog, [("head", dog)])]
            sio.savemat(os.path.join(d, "human_parts", iid + ".mat"), anno_struct(objs), do_compression=True)
            groups = {"hair": 1, "head": 1, "neck": 2, "torso": 2, "luarm": 3, "rlarm": 4, "lhand": 4,
                      "ruleg": 5, "llleg": 6, "rfoot": 6}
            target = np.zeros((h, w))
            for name, m in parts:
                target[m] = groups[name]
            parts_hist = np.bincount(target.astype(int).ravel(), minlength=7).tolist()
        elif k == 1:
            dog = np.zeros((h, w), bool)
            dog[40:60, 60:90] = True
            sio.savemat(os.path.join(d, "human_parts", iid + ".mat"),
                        anno_struct([("dog", 12, dog, [("head", dog)])]), do_compression=False)
        expected[iid] = {
            "parts_hist": parts_hist,
            "edge_count": int(pascal_edges(lm).sum()),
            "normals_valid": int(np.isin(lm, [30, 33, 7]).sum()),
        }
    with open(os.path.join(d, "ImageSets/Context/train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(d, "ImageSets/Context/val.txt"), "w") as f:
        f.write("\n".join(ids[:2]) + "\n")
    json.dump(expected, open(os.path.join(d, "expected.json"), "w"), indent=1)


def gen_nyud():
    d = os.path.join(OUT, "nyud")
    for sub in ["images", "gt_sets", "segmentation", "depth", "normals", "edge"]:
        os.makedirs(os.path.join(d, sub))
    nyu = os.path.join(SHARED, "dense-samples", "tests", "data", "pseudo_nyu_dataset")
    img = Image.open(os.path.join(nyu, "images", "bookstore_0001d_00001.jpg")).convert("RGB")
    depth_mm = np.array(Image.open(os.path.join(nyu, "annotations", "bookstore_0001d_00001.png")))
    ids = ["0001", "0002"]
    for k, iid in enumerate(ids):
        im = img if k == 0 else img.transpose(Image.FLIP_LEFT_RIGHT)
        dm = depth_mm if k == 0 else depth_mm[:, ::-1]
        im.save(os.path.join(d, "images", iid + ".png"))
        depth = (dm.astype(np.float32) / 1000.0)
        np.save(os.path.join(d, "depth", iid + ".npy"), depth if k == 0 else depth.astype(np.float64))
        seg = np.clip(depth * 4, 0, 40).astype(np.uint8)  # 0 = unlabelled, 1..40 classes
        Image.fromarray(seg).save(os.path.join(d, "segmentation", iid + ".png"))
        gy, gx = np.gradient(depth)
        n = np.stack([-gx, -gy, np.ones_like(depth)], -1)
        n /= np.linalg.norm(n, axis=-1, keepdims=True)
        Image.fromarray(((n + 1) / 2 * 255).round().astype(np.uint8)).save(os.path.join(d, "normals", iid + ".png"))
        Image.fromarray(((np.abs(gx) + np.abs(gy)) > 0.05).astype(np.uint8) * 255).save(os.path.join(d, "edge", iid + ".png"))
    with open(os.path.join(d, "gt_sets/train.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    with open(os.path.join(d, "gt_sets/val.txt"), "w") as f:
        f.write(ids[0] + "\n")


def gen_decoder():
    """Routers + heads written from SPEC.md section 2 in torch (an independent implementation),
    with random weights named as distillery names them; inputs (stem tokens, normed adapter
    maps) and logits in eval mode (clean gates, running statistics) and train mode (batch
    statistics, clean gates), plus the running statistics after the train-mode pass:
    tests/fixtures/dense/decoder.safetensors."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.manual_seed(11)
    B, D, L, T, gh, gw, H, W = 2, 16, 4, 2, 3, 5, 22, 38  # H, W not multiples of 4 on purpose
    tasks = [("semseg", 5), ("normals", 3)]
    E = T + 1

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(D, D // 2)
            self.norm = nn.LayerNorm(D // 2)
            self.fc2 = nn.Linear(D // 2, 2 * E)

        def forward(self, tok):
            logits = self.fc2(F.gelu(self.norm(self.fc1(tok)))).mean(1)
            return F.softmax(logits[:, :E], -1)  # clean gates

    class Head(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.proj = nn.ModuleList([nn.Linear(D, D // 4) for _ in range(L)])
            self.conv = nn.Conv2d(L * (D // 4), D, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(D)
            self.cls = nn.Conv2d(D, c, 1)

        def forward(self, maps):
            q = (-(-H // 4), -(-W // 4))
            parts = []
            for k, m in enumerate(maps):
                t = self.proj[k](m.flatten(2).transpose(1, 2))
                t = t.transpose(1, 2).reshape(B, D // 4, gh, gw)
                parts.append(F.interpolate(t, size=q, mode="bilinear", align_corners=False))
            x = self.cls(F.gelu(self.bn(self.conv(torch.cat(parts, 1)))))
            return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

    routers = nn.ModuleDict({f"{k}_{t}": Router() for k in range(L) for t, _ in tasks})
    heads = nn.ModuleDict({t: Head(c) for t, c in tasks})
    with torch.no_grad():
        for p in list(routers.parameters()) + list(heads.parameters()):
            p.copy_(torch.randn(p.shape) * 0.3)
        for t, _ in tasks:
            heads[t].bn.running_mean.copy_(torch.randn(D) * 0.2)
            heads[t].bn.running_var.copy_(torch.rand(D) + 0.5)
    stem = [torch.randn(B, 1 + gh * gw, D) for _ in range(L)]
    normed = [[torch.randn(B, D, gh, gw) for _ in range(L)] for _ in range(T)]
    w = {}
    for k in range(L):
        for t, _ in tasks:
            r = routers[f"{k}_{t}"]
            for n in ("fc1", "norm", "fc2"):
                w[f"routers.{k}.{t}.{n}.weight"] = getattr(r, n).weight
                w[f"routers.{k}.{t}.{n}.bias"] = getattr(r, n).bias
    for t, _ in tasks:
        h = heads[t]
        for k in range(L):
            w[f"heads.{t}.proj.{k}.weight"] = h.proj[k].weight
            w[f"heads.{t}.proj.{k}.bias"] = h.proj[k].bias
        w[f"heads.{t}.conv.weight"] = h.conv.weight
        w[f"heads.{t}.bn.weight"] = h.bn.weight
        w[f"heads.{t}.bn.bias"] = h.bn.bias
        w[f"heads.{t}.bn.running_mean"] = h.bn.running_mean
        w[f"heads.{t}.bn.running_var"] = h.bn.running_var
        w[f"heads.{t}.cls.weight"] = h.cls.weight
        w[f"heads.{t}.cls.bias"] = h.cls.bias
    out = {k: v.detach().clone().contiguous() for k, v in w.items()}
    for k in range(L):
        out[f"in.stem.{k}"] = stem[k]
        for i in range(T):
            out[f"in.normed.{i}.{k}"] = normed[i][k]

    def run(train):
        heads.train(train)
        res = {}
        for t, _ in tasks:
            maps = []
            for k in range(L):
                tok = stem[k][:, 1:]
                experts = [tok.transpose(1, 2).reshape(B, D, gh, gw)] + [normed[i][k] for i in range(T)]
                p = routers[f"{k}_{t}"](tok)
                maps.append(sum(p[:, e, None, None, None] * experts[e] for e in range(E)))
            res[t] = heads[t](maps)
        return res

    with torch.no_grad():
        for t, x in run(False).items():
            out[f"out.eval.{t}"] = x.contiguous()
        for t, x in run(True).items():
            out[f"out.train.{t}"] = x.contiguous()
        for t, _ in tasks:
            out[f"after.{t}.running_mean"] = heads[t].bn.running_mean.clone()
            out[f"after.{t}.running_var"] = heads[t].bn.running_var.clone()
    save_file(out, os.path.join(OUT, "decoder.safetensors"))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    gen_thin()
    gen_labelmaps()
    gen_pascal()
    gen_nyud()
    gen_losses()
    gen_decoder()
    print("wrote", OUT)


def gen_losses():
    """Task losses as the reference implementations compute them (torch), on small random
    logits/labels: tests/fixtures/dense/losses.json."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    B, H, W = 2, 5, 7
    out = {}

    def put(name, logits, labels, loss):
        out[name] = {"shape": list(logits.shape), "logits": logits.flatten().tolist(),
                     "labels": labels.flatten().tolist(), "loss": float(loss)}

    # semseg: CE with ignore 255, summed / valid pixels (= mean over valid).
    x = torch.randn(B, 6, H, W, generator=g)
    y = torch.randint(0, 6, (B, H, W), generator=g)
    y[0, 0, :] = 255
    put("semseg", x, y.float(), F.cross_entropy(x, y, ignore_index=255, reduction="sum") / (y != 255).sum())
    # saliency: 2-class CE, class weights (1 - p, p), p = share of negatives among valid pixels.
    x = torch.randn(B, 2, H, W, generator=g)
    y = (torch.rand(B, H, W, generator=g) > 0.7).long()
    y[1, 2, :] = 255
    valid = y != 255
    p = ((y == 0) & valid).sum().float() / valid.sum()
    wts = torch.stack([1 - p, p])
    put("saliency", x, y.float(), F.cross_entropy(x, y, weight=wts, ignore_index=255, reduction="sum") / valid.sum())
    # edge: BCE, positives 0.95, negatives 0.05, mean over valid pixels.
    x = torch.randn(B, 1, H, W, generator=g) * 3
    y = (torch.rand(B, H, W, generator=g) > 0.8).float()
    y[0, :, 0] = 255
    valid = y != 255
    yy = y.clone(); yy[~valid] = 0
    w = torch.where(yy > 0.5, torch.tensor(0.95), torch.tensor(0.05)) * valid
    bce = F.binary_cross_entropy_with_logits(x[:, 0], yy, weight=w, reduction="sum") / valid.sum()
    put("edge", x, y, bce)
    # normals: L2-normalised prediction, L1 over channels, / valid pixels (zero GT = ignore).
    x = torch.randn(B, 3, H, W, generator=g)
    n = torch.randn(B, 3, H, W, generator=g)
    n = n / n.norm(dim=1, keepdim=True)
    n[:, :, 1, :] = 0
    mask = (n.norm(dim=1, keepdim=True) > 0).float()
    pn = x / x.norm(dim=1, keepdim=True)
    put("normals", x, n, ((pn - n).abs() * mask).sum() / mask.sum())
    # depth: L1 over pixels with GT > 0.
    x = torch.randn(B, 1, H, W, generator=g) + 2
    d = torch.rand(B, 1, H, W, generator=g) * 5
    d[:, :, :, 3] = 0
    mask = (d > 0).float()
    put("depth", x, d, ((x - d).abs() * mask).sum() / mask.sum())
    with open(os.path.join(OUT, "losses.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
