#!/usr/bin/env bash
# Installs what tern needs on a Debian machine (run as root): system libraries, a Rust toolchain
# when there is none, and the Python packages the tests use (TensorBoard's reader, h5py).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# MPI, HDF5 and clang (for bindgen) are for the distributed and data-pipeline crates.
apt-get install -y -qq --no-install-recommends \
  build-essential pkg-config curl ca-certificates git python3 python3-pip \
  libopenmpi-dev openmpi-bin libclang-dev libhdf5-dev protobuf-compiler >/dev/null

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# Debian's own Python refuses pip installs into the system (PEP 668) unless told otherwise.
# TensorBoard's reader and h5py check tern's event files and HDF5 shards in the tests; gguf (llama.cpp's
# gguf-py) checks its GGUF exports.
python3 -m pip install -q tensorboard h5py gguf safetensors numpy 2>/dev/null \
  || python3 -m pip install -q --break-system-packages tensorboard h5py gguf safetensors numpy
echo "setup done: $(cargo --version), $(python3 -c 'import tensorboard, h5py; print("tensorboard", tensorboard.__version__, "h5py", h5py.__version__)')"
