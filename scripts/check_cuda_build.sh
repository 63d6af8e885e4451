#!/usr/bin/env bash
# Compile the CUDA build (`--features cuda`) on a machine without a GPU or a CUDA install:
# NVIDIA's CUDA 13.0 toolkit pieces come from PyPI as wheels (nvcc, headers, CCCL, and the
# cuBLAS / cuRAND / NVRTC / runtime libraries the binary links), unpacked under $CUDA_DIR.
# candle 0.11 links the CUDA libraries (cudarc's `dynamic-linking`), the driver's libcuda too:
# a stub libcuda.so with the driver API's names stands in for it at link time (it is never
# loaded; the GPU machine's driver is). candle's kernels are compiled by nvcc for the compute
# capability in CUDA_COMPUTE_CAP (90 = H100/H200; 80 = A100; 89 = L4/L40).
#
#   scripts/check_cuda_build.sh                  # -> target/release/distillery (CUDA build)
#   CUDA_COMPUTE_CAP=80 CUDA_DIR=/opt/cu13 scripts/check_cuda_build.sh
#   scripts/check_cuda_build.sh --toolkit-only   # fetch and unpack only
#
# Running it needs the NVIDIA driver (CUDA 13: driver >= 580) and libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13 on the loader's path; a
# PyTorch cu130 install ships them (site-packages/nvidia/cu13/lib). `scripts/gpu_session.sh`
# then checks and times it on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_DIR=${CUDA_DIR:-/tmp/distillery-cuda13}
CAP=${CUDA_COMPUTE_CAP:-90}
root="$CUDA_DIR/x/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
    mkdir -p "$CUDA_DIR/wheels"
    for p in "nvidia-cuda-nvcc>=13.0,<13.1" "nvidia-cuda-runtime>=13.0,<13.1" \
        "nvidia-cuda-crt>=13.0,<13.1" "nvidia-cuda-cccl>=13.0,<13.1" "nvidia-nvvm>=13.0,<13.1" \
        "nvidia-cublas>=13.0,<13.1" "nvidia-cuda-nvrtc>=13.0,<13.1" "nvidia-curand>=10.4,<10.5"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$CUDA_DIR/wheels" "$p"
    done
    for w in "$CUDA_DIR"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$CUDA_DIR/x"
    done
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    (cd "$root/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sfn "lib$l.so.13" "lib$l.so"; done \
        && ln -sfn libcurand.so.10 libcurand.so)
fi
# the link-time stand-in for the driver's libcuda.so.1: every cu* name cudarc declares
stub="$CUDA_DIR/stub"
if [ ! -f "$stub/libcuda.so" ]; then
    mkdir -p "$stub"
    cargo fetch -q
    cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
    grep -ohE "fn (cu[A-Za-z0-9_]+)\(" "$cudarc/src/driver/sys/mod.rs" | sed 's/fn //;s/(//' | sort -u \
        | sed 's/.*/int &(void){return 999;}/' > "$stub/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/stub.c"
fi
export CUDA_HOME="$root" PATH="$root/bin:$PATH" CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP="$CAP"
nvcc --version | tail -1
if [ "${1:-}" = "--toolkit-only" ]; then
    echo "toolkit in $root, libcuda stub in $stub"
    exit 0
fi
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L $stub" cargo build --release --features cuda --bin distillery
echo "built target/release/distillery with --features cuda (compute capability $CAP)"
