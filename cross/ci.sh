#!/usr/bin/env bash
# The cross-compilation and OpenWrt checks, as CI runs them (one step of .ci/run):
#   1. cross/build.sh all: stripped static binaries for every target in targets.txt;
#   2. cross/check-size.sh: the size budget;
#   3. cross/test.sh: qpq-proto and qpq-core unit tests on aarch64 and armv7 under qemu;
#   4. openwrt/build-ipk.sh: the .ipk for each OpenWrt 24.10 architecture, each verified and
#      installed into a scratch root by openwrt/test/install.sh;
#   5. tests/tests/05_cross.rs with QPQTEST_CROSS=1: every cross server under qemu serves the
#      native client; the installed package, configured from UCI, serves it too;
#   6. the end-to-end suites 01_auth and 02_delivery against the aarch64 and armv7 servers:
#      QPQTEST_BIN_QPQ_SERVER_LITE points the harness at a wrapper that execs qemu.
# Installs what it needs (Debian cross gcc, qemu-user-static, busybox-static, rustup targets,
# rust-src). Prints the time each step took. Run from anywhere: bash cross/ci.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$CROSS_ROOT"

start=$(date +%s)
step_start=$start
step() {
    local now
    now=$(date +%s)
    [ "$now" = "$start" ] || echo "   ($((now - step_start)) s)"
    step_start=$now
    echo "== cross: $*"
}

step "prerequisites"
cross_apt_install busybox-static file

step "build (cross/build.sh all)"
bash cross/build.sh all

step "size budget (cross/check-size.sh)"
bash cross/check-size.sh

for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
    step "unit tests under qemu: $t (cross/test.sh)"
    bash cross/test.sh "$t"
done

step "OpenWrt packages (openwrt/build-ipk.sh, openwrt/test/install.sh)"
ipk_dir="$CROSS_TARGET_DIR/ipk"
rm -rf "$ipk_dir"
bash openwrt/build-ipk.sh --out "$ipk_dir"
for ipk in "$ipk_dir"/*.ipk; do
    arch="$(basename "$ipk" .ipk)"
    arch="${arch#qpq-server-lite_*_}"
    scratch="$(mktemp -d)"
    bash openwrt/test/install.sh "$ipk" "$scratch/root" "$arch" >"$scratch/log" ||
        { cat "$scratch/log"; exit 1; }
    echo "$(basename "$ipk"): $(stat -c %s "$ipk") bytes, verified and installed"
    rm -rf "$scratch"
done

step "servers under qemu and the installed package (tests/tests/05_cross.rs)"
QPQTEST_CROSS=1 QPQ_CROSS_TARGET_DIR="$CROSS_TARGET_DIR" \
    cargo test --locked -p qpq-tests --test 05_cross -- --nocapture --test-threads=1

for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
    step "end-to-end suites against the $t server under qemu"
    cross_target_info "$t"
    wrapper="$CROSS_TARGET_DIR/run/$t/qpq-server-lite"
    mkdir -p "$(dirname "$wrapper")"
    printf '#!/bin/sh\nexec %s %s "$@"\n' "$T_QEMU" "$CROSS_TARGET_DIR/bin/$t/qpq-server-lite" >"$wrapper"
    chmod +x "$wrapper"
    QPQTEST_BIN_QPQ_SERVER_LITE="$wrapper" \
        cargo test --locked -p qpq-tests --test 01_auth --test 02_delivery
done

step "done"
echo "cross: all checks passed in $(($(date +%s) - start)) s"
