#!/usr/bin/env bash
# Quick start: set up the machine, build tern, and train the embedded tiny recipe on the sample data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release -p tern-cli
./target/release/tern train "$@"
