#!/usr/bin/env bash
# Installs everything icmp-guard needs to build, run and test on Debian 12 (bookworm), as root.
# Idempotent: what is already present is left alone, so running it again is cheap.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages and bpf-linker)" >&2
  exit 1
fi

# Build: Debian's rustc-web compiles the kernel crate (it ships a prebuilt core for
# bpfel-unknown-none); bpf-linker links it against LLVM 22, the LLVM of that compiler.
# Run and test: the tools the tests drive. VM tests: qemu, busybox and the archive keyring.
packages=(
  rustc-web cargo-web libstd-rust-web-dev-bpf
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  hping3 nmap iputils-ping python3 iproute2 libcap2-bin
  # The inbound ICMP guard's tests and benchmark: trafgen (floods), scapy for Debian's python3
  # (ICMP errors, neighbour discovery, malformed frames), nftables (the benchmark's
  # comparison), ethtool (veth offloads in the benchmark).
  netsniff-ng python3-scapy nftables ethtool
)
while read -r p; do
  [ -n "$p" ] && packages+=("$p")
done < "$here/vm-deps.txt"

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# cargo from rustup comes first on PATH; bpf-linker is installed where cargo installs.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "setup.sh: no cargo on PATH; install Rust (rustup, stable) first" >&2
  exit 1
fi
if ! bpf-linker --version 2>/dev/null | grep -q "^bpf-linker 0\.13\."; then
  echo "setup.sh: building bpf-linker 0.13 against LLVM 22 (about 4 minutes)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --quiet bpf-linker --version '~0.13' \
    --no-default-features --features llvm-22
fi
echo "setup.sh: toolchain ready ($(bpf-linker --version), $(/usr/bin/rustc --version))"
