#!/usr/bin/env python3
"""Arrange the BSDS500 sample in ../shared/fixtures/bsds-bench as a PASCAL-Context style folder
(MTI-Net layout) for smoke-scale stage-2 runs on real photos with real human boundaries:

    python scripts/make_bsds_pascal.py OUT_DIR

JPEGImages/ the 5 photos; pascal-context/trainval/<id>.mat LabelMap = annotator 1's
segmentation (so the edge task is that annotator's boundaries, derived as the loaders derive
PASCAL edges); semseg/VOC12/<id>.png = segment index mod 21 (real region geometry, arbitrary
class ids); ImageSets/Context/{train,val}.txt. Needs numpy, scipy, pillow.
"""
import os
import shutil
import sys

import numpy as np
import scipy.io as sio
from PIL import Image

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "bsds-bench")
out = sys.argv[1]
for sub in ["JPEGImages", "ImageSets/Context", "semseg/VOC12", "pascal-context/trainval"]:
    os.makedirs(os.path.join(out, sub), exist_ok=True)
ids = sorted(f[:-4] for f in os.listdir(os.path.join(SRC, "images")))
for i in ids:
    shutil.copy(os.path.join(SRC, "images", i + ".jpg"), os.path.join(out, "JPEGImages", i + ".jpg"))
    gt = sio.loadmat(os.path.join(SRC, "groundTruth", i + ".mat"))["groundTruth"]
    seg = gt[0, 0]["Segmentation"][0, 0].astype(np.uint16)
    sio.savemat(os.path.join(out, "pascal-context/trainval", i + ".mat"), {"LabelMap": seg}, do_compression=True)
    Image.fromarray((seg % 21).astype(np.uint8)).save(os.path.join(out, "semseg/VOC12", i + ".png"))
for split in ["train", "val"]:
    with open(os.path.join(out, "ImageSets/Context", split + ".txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
print("wrote", out, len(ids), "images")
