#!/usr/bin/env bash
# Ferry's test command: installs what the tests need on a fresh Debian 12 machine (run as root),
# then runs every test of the workspace. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The QEMU the tests run on: 10.0 from Debian's bookworm-backports (Debian 12's own 7.2 loses
# guest writes under TCG after a migration's second dirty sync; netem-tests/guest/README.md),
# with its qemu-utils (qemu-nbd, qemu-img, qemu-io: the NBD interop tests, replica manifests).
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
# namespaces, veth, tc), iputils-ping (RTT checks of the emulated WAN), seabios and
# ipxe-qemu (the BIOS and NIC ROMs, also for the unpacked QEMU 7.2; QEMU 10 pulls them in).
packages=(nasm iproute2 iputils-ping seabios ipxe-qemu)
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

# Debian 12's own QEMU 7.2 for one smoke test, unpacked (not installed) beside QEMU 10: it
# finds its modules and ROMs relative to the binary; BIOS and iPXE ROMs are the system's.
QEMU72_ROOT=/var/cache/ferry/qemu-7.2/root
QEMU72_BIN=$QEMU72_ROOT/usr/bin/qemu-system-x86_64
unpack_qemu72() {
    [ -x "$QEMU72_BIN" ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "QEMU 7.2 not unpacked in $QEMU72_ROOT (run as root): its smoke test is skipped" >&2
        return
    fi
    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download -q qemu-system-x86/bookworm qemu-system-common/bookworm qemu-system-data/bookworm)
    mkdir -p "$QEMU72_ROOT/usr/share" "$QEMU72_ROOT/usr/lib/ipxe"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$QEMU72_ROOT"; done
    rm -rf "$debs"
    ln -sfn /usr/share/seabios "$QEMU72_ROOT/usr/share/seabios"
    ln -sfn /usr/lib/ipxe/qemu "$QEMU72_ROOT/usr/lib/ipxe/qemu"
    "$QEMU72_BIN" --version | head -n1
}
unpack_qemu72

cargo build --workspace --all-targets
cargo test --workspace "$@"

# The QEMU 7.2 smoke test: a held migration of a busy guest, whose RAM check must find the pages
# 7.2's TCG loses (ferry_qmp::known_issues), and none with the guest's retouch workaround.
# And ferry-host migrate refuses that QEMU.
if [ -x "$QEMU72_BIN" ]; then
    FERRY_QEMU=$QEMU72_BIN cargo test -p ferry-netem --test qemu_guest \
        held_busy_guest_ram_matches_unless_qemu_has_the_tcg_dirty_tracking_issue
    FERRY_QEMU=$QEMU72_BIN cargo test -p ferry-netem --test host_faults_wan \
        migrate_refuses_a_qemu_with_a_known_issue
fi
