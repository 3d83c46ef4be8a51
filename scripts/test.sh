#!/usr/bin/env bash
# Ferry's test command: installs what the tests need on a fresh Debian 12 machine (run as root),
# then runs every test of the workspace. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The QEMU the tests run on: 10.0 from Debian's bookworm-backports (Debian 12's own 7.2 loses
# guest writes under TCG after a migration's second dirty sync; netem-tests/guest/README.md).
QEMU_SUITE=bookworm-backports
QEMU_MIN_MAJOR=10
BACKPORTS_SOURCES=/etc/apt/sources.list.d/backports.sources

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$1 (run as root to install it)" >&2
        exit 1
    fi
}

# Adds bookworm-backports (deb822, the same mirror as Debian's own sources) unless some apt
# source already names it.
ensure_backports() {
    if grep -rqs "$QEMU_SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    need_root "apt has no $QEMU_SUITE source"
    local mirror
    mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}' | head -n1)
    : "${mirror:=http://deb.debian.org/debian}"
    cat >"$BACKPORTS_SOURCES" <<SOURCES
Types: deb
URIs: $mirror
Suites: $QEMU_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    echo "added $BACKPORTS_SOURCES ($mirror $QEMU_SUITE)"
}

# The major version of the installed qemu-system-x86_64 (0 if none).
qemu_major() {
    command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ] || ! command -v qemu-img >/dev/null; then
    need_root "QEMU >= $QEMU_MIN_MAJOR is not installed"
    ensure_backports
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t "$QEMU_SUITE" qemu-system-x86 qemu-utils
fi
if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
    echo "qemu-system-x86_64 is $(qemu-system-x86_64 --version | head -n1), the tests need >= $QEMU_MIN_MAJOR.0" >&2
    exit 1
fi
qemu-system-x86_64 --version | head -n1

# Other system packages the tests use: nasm (assembles the test guest), iproute2 (network
# namespaces, veth, tc), iputils-ping (RTT checks of the emulated WAN).
packages=(nasm iproute2 iputils-ping)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    need_root "missing packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install a Rust toolchain (rustup) first" >&2
    exit 1
fi

cargo build --workspace --all-targets
cargo test --workspace "$@"
