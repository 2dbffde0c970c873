#!/usr/bin/env bash
# Runs the icmp-guard agent with its embedded default policy (or the arguments given, which go
# to `icmp-guard run`), after installing what it needs. Stop it with Ctrl-C: the kernel
# programs detach and every socket is allowed again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
exec target/release/icmp-guard run "$@"
