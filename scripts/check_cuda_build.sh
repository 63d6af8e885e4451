#!/usr/bin/env bash
# Compile the CUDA build (`--features cuda`) on a Debian 12 machine that has no GPU: installs
# Debian's CUDA toolkit (nvidia-cuda-toolkit 11.8, from the contrib/non-free components), then
# builds the release binary. candle's kernels are compiled by nvcc at build time for the
# compute capability in CUDA_COMPUTE_CAP (no nvidia-smi is needed when it is set); CUDA 11.8
# knows up to 9.0 but not candle's `90a` target, so 8.0 is the default here. Running on a GPU
# needs only the driver (cudarc loads libcuda at run time).
#
#   sudo scripts/check_cuda_build.sh            # or CUDA_COMPUTE_CAP=86 ...
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
    cat > /etc/apt/sources.list.d/distillery-nonfree.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -1
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}" cargo build --release --features cuda --bin distillery
echo "built target/release/distillery with --features cuda"
