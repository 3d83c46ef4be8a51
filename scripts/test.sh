#!/usr/bin/env bash
# Ferry's test command: installs what the tests need on a fresh Debian machine (run as root),
# then runs every test of the workspace. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use: QEMU (real guests under TCG), qemu-utils (qemu-nbd, qemu-img,
# qemu-io: the NBD interop tests and the replica manifests), nasm (assembles the test guest),
# iproute2 (network namespaces, veth, tc), iputils-ping (RTT checks of the emulated WAN).
packages=(qemu-system-x86 qemu-utils nasm iproute2 iputils-ping)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a Rust toolchain (rustup) first" >&2
    exit 1
fi

cargo build --workspace --all-targets
cargo test --workspace "$@"
