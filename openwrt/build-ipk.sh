#!/usr/bin/env bash
# Builds OpenWrt 24.10 .ipk packages of qpq-server-lite straight from the static binaries
# that cross/build.sh makes, without an OpenWrt SDK (the SDK route is
# openwrt/qpq-server-lite/Makefile).
#
#   openwrt/build-ipk.sh [--arch ARCH]... [--bin-dir DIR] [--out DIR] [--release N]
#
#   --arch ARCH    OpenWrt package architecture (repeatable); default: all of
#                  aarch64_cortex-a53 aarch64_generic arm_cortex-a7_neon-vfpv4 arm_cortex-a9 x86_64
#   --bin-dir DIR  where cross/build.sh put the binaries; default target/cross/bin
#   --out DIR      default target/cross/ipk
#   --release N    package release; the version is the workspace version, "0.1.0-N" (default 1)
#
# Prints the path of each package. The archives are reproducible: same binary, same bytes.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
files="$here/qpq-server-lite/files"

# OpenWrt architecture -> Rust target. arm_cortex-a9 (bcm53xx) has no FPU: soft-float.
rust_target_of() {
    case "$1" in
        aarch64_cortex-a53 | aarch64_cortex-a72 | aarch64_generic) echo aarch64-unknown-linux-musl ;;
        arm_cortex-a7_neon-vfpv4 | arm_cortex-a15_neon-vfpv4 | arm_cortex-a9_vfpv3-d16 | arm_cortex-a9_neon)
            echo armv7-unknown-linux-musleabihf ;;
        arm_cortex-a9 | arm_cortex-a7) echo armv7-unknown-linux-musleabi ;;
        x86_64) echo x86_64-unknown-linux-musl ;;
        *) echo "build-ipk: no Rust target for OpenWrt architecture '$1'" >&2; return 1 ;;
    esac
}

arches=()
bin_dir="${QPQ_CROSS_TARGET_DIR:-$root/target/cross}/bin"
out="${QPQ_CROSS_TARGET_DIR:-$root/target/cross}/ipk"
release=1
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arches+=("${2:?}"); shift 2 ;;
        --bin-dir) bin_dir="${2:?}"; shift 2 ;;
        --out) out="${2:?}"; shift 2 ;;
        --release) release="${2:?}"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "build-ipk: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ ${#arches[@]} -gt 0 ] ||
    arches=(aarch64_cortex-a53 aarch64_generic arm_cortex-a7_neon-vfpv4 arm_cortex-a9 x86_64)

version="$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version *= *"\(.*\)"/\1/p}' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "build-ipk: no workspace version in Cargo.toml" >&2; exit 1; }
license="$(sed -n '/^\[workspace.package\]/,/^\[/{s/^license *= *"\(.*\)"/\1/p}' "$root/Cargo.toml")"

# Deterministic tar.gz of the current directory's contents, as ipkg-build makes them.
tgz() {
    tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -cf - . | gzip -n9
}

mkdir -p "$out"
for arch in "${arches[@]}"; do
    target="$(rust_target_of "$arch")"
    bin="$bin_dir/$target/qpq-server-lite"
    [ -x "$bin" ] || { echo "build-ipk: $bin missing; run cross/build.sh $target" >&2; exit 1; }
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    data="$work/data" control="$work/control"
    mkdir -p "$data/usr/bin" "$data/etc/init.d" "$data/etc/config" "$data/lib/upgrade/keep.d" "$control"
    install -m 0755 "$bin" "$data/usr/bin/qpq-server-lite"
    install -m 0755 "$files/qpq-server-lite.init" "$data/etc/init.d/qpq-server-lite"
    install -m 0644 "$files/qpq.config" "$data/etc/config/qpq"
    install -m 0644 "$files/qpq-server-lite.keep" "$data/lib/upgrade/keep.d/qpq-server-lite"
    # As ipkg-build counts it: the uncompressed data archive.
    installed_size="$( (cd "$data" && tgz) | gzip -dc | wc -c)"

    cat >"$control/control" <<EOF
Package: qpq-server-lite
Version: $version-$release
Depends: libc, procd
Source: qpq-lite/server-lite
SourceName: qpq-server-lite
License: $license
Section: net
Require-User: qpq=5001:qpq=5001
Architecture: $arch
Installed-Size: $installed_size
Maintainer: qpq-lite developers
Description:  End-to-end encrypted messaging relay (QUIC + TLS 1.3, redb store)
 qpq-server-lite stores and forwards ciphertext for the qpq messenger. It
 authenticates users with OPAQUE and never sees plaintext. Options are in
 /etc/config/qpq; data lives in /etc/qpq unless moved to USB storage.
EOF
    printf '/etc/config/qpq\n' >"$control/conffiles"
    install -m 0755 "$here/ipk/postinst" "$control/postinst"
    install -m 0755 "$here/ipk/prerm" "$control/prerm"

    pkg="$work/pkg"
    mkdir -p "$pkg"
    printf '2.0\n' >"$pkg/debian-binary"
    (cd "$control" && tgz) >"$pkg/control.tar.gz"
    (cd "$data" && tgz) >"$pkg/data.tar.gz"
    ipk="$out/qpq-server-lite_${version}-${release}_${arch}.ipk"
    # The outer archive is a gzipped tar, as OpenWrt's ipkg-build writes it (opkg also reads
    # Debian-style ar archives), members in ipkg-build's order.
    (cd "$pkg" && tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 \
        -cf - ./debian-binary ./data.tar.gz ./control.tar.gz | gzip -n9) >"$ipk.tmp"
    mv "$ipk.tmp" "$ipk"
    rm -rf "$work"
    trap - EXIT
    echo "$ipk"
done
