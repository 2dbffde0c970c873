#!/usr/bin/env bash
# Runs every test: formatting and lints, unit and parser tests, the privileged end-to-end tests
# against this machine's kernel (cgroup enforcer), and the same end-to-end tests inside qemu VMs
# booting Debian's 5.10, 6.1 and 6.12 kernels with BPF LSM (LSM enforcer). As root.
# Installs what it needs first. Any failure, or any test that did not run, fails the whole.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --quiet --workspace --all-targets -- -D warnings

echo "== host tests (unit, parsers, audit, end to end with the cgroup enforcer and the XDP guard on $(uname -r))"
cargo test --release --workspace 2>&1 | tee target/host-tests.log
# A test binary that ran nothing, or skipped anything, is a failure here.
if grep -E "test result: .* [1-9][0-9]* ignored" target/host-tests.log; then
  echo "test.sh: some tests were ignored" >&2
  exit 1
fi
for t in enforcement kubearmor_scenario guard; do
  grep -A2 "Running tests/$t.rs" target/host-tests.log | grep -qE "running [1-9]" || {
    echo "test.sh: the $t tests did not run" >&2
    exit 1
  }
done

echo "== VM tests (LSM enforcer on Debian kernels under qemu)"
cargo xtask vm-test --kernel "${ICMP_GUARD_VM_KERNELS:-all}" 2>&1 | tee target/vm-tests.log

# Every stage above stops the script on failure, so reaching here means nothing failed.
passed=$(cat target/host-tests.log target/vm-tests.log \
  | grep -oE "test result: ok\. [0-9]+ passed" | awk '{s += $4} END {print s + 0}')
echo "test.sh: host suites and VM suites on every kernel passed"
echo "${passed} passed, 0 failed"
