#!/usr/bin/env bash
# What a CUDA machine checks and times in one sitting (a lent GPU is held for minutes, so each
# part is one command). Needs a `--features cuda` release binary, python3 with torch, timm,
# transformers, numpy and safetensors, and the digits fixture (../shared/fixtures/digits).
#
#   BIN=target/release/distillery DIGITS=../shared/fixtures/digits LOG=/tmp/gpu \
#       scripts/gpu_session.sh check|bench-vit|bench-cnn
#
# check:     the CUDA build against the timm/transformers references (scripts/gpu_parity.py), then
#            the same short `distill` and `transfer` runs on the CPU and on the GPU, side by side
#            (same seeds: the per-step losses must agree to float rounding).
# bench-vit: ViT-B/16 forward and the SAK stage-1 step, `distillery bench` and PyTorch alternating.
# bench-cnn: the mobile students' inference (batch 1 / 32) and training step, likewise.
# Every timing line is also appended to $LOG/bench.jsonl; ROUNDS (default 2) repeats the benches.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/distillery}
DIGITS=${DIGITS:-../shared/fixtures/digits}
LOG=${LOG:-/tmp/gpu}
mkdir -p "$LOG"
PY=${PY:-python3}

d() { # distillery bench, one JSON line
    "$BIN" bench --device cuda --json "$@" 2>>"$LOG/stderr.log" | tail -1 | tee -a "$LOG/bench.jsonl"
}
t() { # PyTorch counterpart, one JSON line
    "$PY" "$@" 2>>"$LOG/stderr.log" | tail -1 | tee -a "$LOG/bench.jsonl"
}

check() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "$PY" scripts/gpu_parity.py --bin "$BIN" --device cuda
    for dev in cpu cuda; do
        local t0=$SECONDS
        "$BIN" distill --teacher tests/fixtures/models/dinov2 --teacher tests/fixtures/models/sam \
            --student tests/fixtures/models/timm-vit --images "$DIGITS/unlabeled" --out "$LOG/distill-$dev" \
            --steps 8 --batch-size 4 --image-size 32 --device "$dev" --quiet \
            || echo "distill on $dev failed"
        echo "distill on $dev: $((SECONDS - t0)) s"
        t0=$SECONDS
        "$BIN" transfer --teacher tests/fixtures/models/dinov2 \
            --student tests/fixtures/models/timm-resnet-basic --labeled "$DIGITS/train" \
            --test "$DIGITS/test" --transfer "$DIGITS/unlabeled" --out "$LOG/transfer-$dev" \
            --image-size 32 --teacher-image-size 28 --batch-size 32 --teacher-lr 1e-3 \
            --layer-decay 1 --distill-lr 2e-3 --finetune-lr 1e-3 --min-crop-scale 0.5 \
            --teacher-epochs 3 --distill-epochs 2 --finetune-epochs 2 --device "$dev" --quiet \
            || echo "transfer on $dev failed"
        echo "transfer on $dev: $((SECONDS - t0)) s"
        # a FastViT student: depthwise convolutions and BatchNorm trained on the device
        "$BIN" transfer --teacher tests/fixtures/models/dinov2 \
            --student tests/fixtures/models/timm-fastvit-t8 --labeled "$DIGITS/train" \
            --test "$DIGITS/test" --transfer "$DIGITS/unlabeled" --out "$LOG/transfer-fastvit-$dev" \
            --image-size 32 --teacher-image-size 28 --batch-size 32 --teacher-epochs 1 \
            --distill-epochs 2 --finetune-epochs 1 --distill-lr 2e-3 --device "$dev" --quiet \
            > /dev/null || echo "fastvit transfer on $dev failed"
    done
    "$PY" - "$LOG" <<'PY'
import json, pathlib, sys
log = pathlib.Path(sys.argv[1])
def rows(p):
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []
def losses(run):
    out = {}
    for f in sorted(run.rglob("metrics.jsonl")):
        for r in rows(f):
            if "loss" in r and "step" in r:
                out[(str(f.parent.relative_to(run)), r["step"])] = r["loss"]
    return out
for name in ["distill", "transfer", "transfer-fastvit"]:
    a, b = losses(log / f"{name}-cpu"), losses(log / f"{name}-cuda")
    common = sorted(set(a) & set(b))
    if not common:
        print(f"{name}: no common steps (cpu {len(a)}, cuda {len(b)})")
        continue
    worst = max(common, key=lambda k: abs(a[k] - b[k]) / max(abs(a[k]), 1e-12))
    rel = abs(a[worst] - b[worst]) / max(abs(a[worst]), 1e-12)
    print(f"{name}: {len(common)} logged steps on both; largest relative loss difference {rel:.2e} at {worst}")
    for k in common[:3] + common[-2:]:
        print(f"  {k[0]:<28} step {k[1]:>4}: cpu {a[k]:.6f}  cuda {b[k]:.6f}")
for dev in ["cpu", "cuda"]:
    p = log / f"transfer-{dev}" / "report.json"
    if p.is_file():
        for r in json.loads(p.read_text())["rows"]:
            print(dev, {k: r.get(k) for k in ("mode", "stage", "split", "top1", "mean_class_acc")})
PY
}

bench_vit() {
    for _ in $(seq "${ROUNDS:-2}"); do
        d --iters 20 --warmup 3 --batch 8
        t scripts/bench_torch.py --device cuda --iters 20 --warmup 3 --batch 8
        d --iters 10 --warmup 3 --batch 64
        t scripts/bench_torch.py --device cuda --iters 10 --warmup 3 --batch 64
        d --iters 10 --warmup 3 --batch 64 --dtype bf16
        t scripts/bench_torch.py --device cuda --iters 10 --warmup 3 --batch 64 --dtype bf16
        d --task stage1-step --iters 10 --warmup 3 --batch 8
        t scripts/bench_torch_stage1.py --device cuda --iters 10 --warmup 3 --batch 8
        d --task stage1-step --cached --iters 10 --warmup 3 --batch 8
        t scripts/bench_torch_stage1.py --device cuda --cached --iters 10 --warmup 3 --batch 8
        d --task stage1-step --iters 5 --warmup 2 --batch 32
        t scripts/bench_torch_stage1.py --device cuda --iters 5 --warmup 2 --batch 32
    done
}

bench_cnn() {
    for _ in $(seq "${ROUNDS:-2}"); do
        for m in fastvit_t8 mobilevitv2_100 resnet50; do
            d --model "$m" --image 256 --batch 1 --iters 30 --warmup 5
            t scripts/bench_torch.py --device cuda --timm "$m" --image 256 --batch 1 --iters 30 --warmup 5
            d --model "$m" --image 256 --batch 32 --iters 10 --warmup 3
            t scripts/bench_torch.py --device cuda --timm "$m" --image 256 --batch 32 --iters 10 --warmup 3
            d --task train-step --model "$m" --image 256 --batch 32 --iters 10 --warmup 3
            t scripts/bench_torch.py --device cuda --timm "$m" --image 256 --batch 32 --iters 10 --warmup 3 --train
        done
    done
}

case "${1:-}" in
    check) check ;;
    bench-vit) bench_vit ;;
    bench-cnn) bench_cnn ;;
    *) echo "usage: $0 check|bench-vit|bench-cnn" >&2; exit 2 ;;
esac
