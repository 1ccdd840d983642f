#!/usr/bin/env bash
# Verifies an .ipk and installs it into a scratch root the way opkg does, offline:
#
#   openwrt/test/install.sh IPK ROOT [ARCH]
#
# 1. the outer archive: ./debian-binary ("2.0"), ./data.tar.gz, ./control.tar.gz;
# 2. control fields (Package, Version, Depends, Architecture = ARCH, Maintainer, License,
#    Section, Installed-Size = the unpacked data size, Description), conffiles, and the
#    postinst/prerm scripts (POSIX sh, honour $IPKG_INSTROOT);
# 3. the data: exactly the expected files, owned by root, with their modes; a static ELF
#    for ARCH's machine;
# 4. the install: data unpacked into ROOT (given a minimal OpenWrt base-files passwd/group),
#    usr/lib/opkg/info/qpq-server-lite.{control,list,conffiles,postinst,prerm} and a
#    usr/lib/opkg/status entry, then postinst with IPKG_INSTROOT=ROOT: the qpq account, the
#    data directory owned by it, the rc.d links; postinst again (idempotent); prerm and
#    postinst once more (links removed and restored).
# Prints "ok: ..." per check and exits non-zero at the first failure; the last line is
# "uid=N gid=N" of the service account.
set -euo pipefail

ipk="${1:?usage: install.sh IPK ROOT [ARCH]}"
root="${2:?usage: install.sh IPK ROOT [ARCH]}"
arch="${3:-}"
pkg=qpq-server-lite

fail() { echo "install-test: FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Outer archive.
members="$(tar -tzf "$ipk" | tr '\n' ' ')"
[ "$members" = "./debian-binary ./data.tar.gz ./control.tar.gz " ] ||
    fail "outer archive holds '$members'"
tar -xzf "$ipk" -C "$work"
[ "$(cat "$work/debian-binary")" = "2.0" ] || fail "debian-binary is not 2.0"
ok "outer archive: debian-binary 2.0, data.tar.gz, control.tar.gz"

# 2. Control.
mkdir "$work/control"
tar -xzf "$work/control.tar.gz" -C "$work/control"
ctl="$work/control/control"
[ "$(tar -tzf "$work/control.tar.gz" | sort | tr '\n' ' ')" = "./ ./conffiles ./control ./postinst ./prerm " ] ||
    fail "control.tar.gz holds $(tar -tzf "$work/control.tar.gz" | tr '\n' ' ')"
field() { sed -n "s/^$1: *//p" "$ctl"; }
for f in Package Version Depends Architecture Maintainer License Section Installed-Size Description; do
    [ -n "$(field "$f")" ] || fail "control has no $f"
done
[ "$(field Package)" = "$pkg" ] || fail "Package is $(field Package)"
field Version | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+$' || fail "Version $(field Version)"
[ -z "$arch" ] || [ "$(field Architecture)" = "$arch" ] || fail "Architecture $(field Architecture), want $arch"
field Depends | grep -qw libc || fail "Depends lacks libc: $(field Depends)"
data_size="$(gzip -dc "$work/data.tar.gz" | wc -c)"
[ "$(field Installed-Size)" = "$data_size" ] || fail "Installed-Size $(field Installed-Size), data is $data_size"
grep -q '^ ' "$ctl" || fail "Description has no continuation lines"
[ "$(cat "$work/control/conffiles")" = "/etc/config/qpq" ] || fail "conffiles: $(cat "$work/control/conffiles")"
for s in postinst prerm; do
    [ -x "$work/control/$s" ] || fail "$s is not executable"
    [ "$(head -1 "$work/control/$s")" = "#!/bin/sh" ] || fail "$s is not a /bin/sh script"
    sh -n "$work/control/$s" || fail "$s has a syntax error"
    grep -q 'IPKG_INSTROOT' "$work/control/$s" || fail "$s ignores IPKG_INSTROOT"
done
ok "control: $(field Package) $(field Version) $(field Architecture), Depends: $(field Depends)"

# 3. Data.
expected="./etc/config/qpq ./etc/init.d/qpq-server-lite ./lib/upgrade/keep.d/qpq-server-lite ./usr/bin/qpq-server-lite "
files="$(tar -tzf "$work/data.tar.gz" | grep -v '/$' | sort | tr '\n' ' ')"
[ "$files" = "$expected" ] || fail "data holds '$files'"
tar -tvzf "$work/data.tar.gz" | awk '$2 != "0/0" { bad = 1 } END { exit bad }' ||
    fail "data has files not owned by 0/0"
mode() { tar -tvzf "$work/data.tar.gz" "./$1" | awk '{print $1}'; }
[ "$(mode usr/bin/qpq-server-lite)" = "-rwxr-xr-x" ] || fail "binary mode $(mode usr/bin/qpq-server-lite)"
[ "$(mode etc/init.d/qpq-server-lite)" = "-rwxr-xr-x" ] || fail "init script mode"
[ "$(mode etc/config/qpq)" = "-rw-r--r--" ] || fail "config mode"
mkdir "$work/data"
tar -xzf "$work/data.tar.gz" -C "$work/data"
bin="$work/data/usr/bin/qpq-server-lite"
machine="$(readelf -h "$bin" | sed -n 's/^ *Machine: *//p')"
case "$(field Architecture)" in
    aarch64_*) want="AArch64" ;;
    arm_*) want="ARM" ;;
    x86_64) want="Advanced Micro Devices X86-64" ;;
    *) fail "unknown Architecture $(field Architecture)" ;;
esac
[ "$machine" = "$want" ] || fail "binary is for $machine, Architecture says $want"
readelf -lW "$bin" | grep -q INTERP && fail "binary is dynamically linked"
ok "data: 4 files, root-owned, static $machine binary"

# 4. Install as opkg does.
mkdir -p "$root/etc" "$root/usr/lib/opkg/info"
chmod 0755 "$root"
# OpenWrt base-files' accounts, for the postinst to add to.
[ -f "$root/etc/passwd" ] || cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/ash
daemon:*:1:1:daemon:/var:/bin/false
ftp:*:55:55:ftp:/home/ftp:/bin/false
network:*:101:101:network:/var:/bin/false
nobody:*:65534:65534:nobody:/var:/bin/false
ntp:x:123:123:ntp:/var/run/ntp:/bin/false
EOF
[ -f "$root/etc/group" ] || cat >"$root/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
adm:x:4:
mail:x:8:
dialout:x:20:
audio:x:29:
www-data:x:33:
ftp:x:55:
users:x:100:
network:x:101:
nogroup:x:65534:
ntp:x:123:ntp
EOF
[ -f "$root/etc/shadow" ] || printf 'root:::0:99999:7:::\ndaemon:*:0:0:99999:7:::\n' >"$root/etc/shadow"
tar -xzf "$work/data.tar.gz" -C "$root"
info="$root/usr/lib/opkg/info"
cp "$ctl" "$info/$pkg.control"
for s in conffiles postinst prerm; do cp -p "$work/control/$s" "$info/$pkg.$s"; done
tar -tzf "$work/data.tar.gz" | grep -v '/$' | sed 's#^\./#/#' >"$info/$pkg.list"
{
    echo "Package: $pkg"
    echo "Version: $(field Version)"
    echo "Depends: $(field Depends)"
    echo "Status: install user installed"
    echo "Architecture: $(field Architecture)"
    echo "Conffiles:"
    echo " /etc/config/qpq $(md5sum <"$root/etc/config/qpq" | cut -d' ' -f1)"
    echo "Installed-Time: $(date +%s)"
    echo
} >>"$root/usr/lib/opkg/status"
ok "installed into $root (info files and status entry)"

run_postinst() { IPKG_INSTROOT="$root" sh "$info/$pkg.postinst" || fail "postinst exited $?"; }
run_postinst
line="$(grep "^qpq:" "$root/etc/passwd")" || fail "postinst created no qpq user"
uid="$(echo "$line" | cut -d: -f3)"
gid="$(echo "$line" | cut -d: -f4)"
[ "$uid" -gt 0 ] || fail "qpq has uid $uid"
[ "$(echo "$line" | cut -d: -f7)" = /bin/false ] || fail "qpq has a login shell"
grep -q "^qpq:x:$gid:" "$root/etc/group" || fail "no qpq group with gid $gid"
grep -q "^qpq:" "$root/etc/shadow" || fail "no shadow entry for qpq"
[ -d "$root/etc/qpq" ] || fail "no data directory /etc/qpq"
[ "$(stat -c '%u:%g %a' "$root/etc/qpq")" = "$uid:$gid 700" ] ||
    fail "/etc/qpq is $(stat -c '%u:%g %a' "$root/etc/qpq")"
for l in S95 K10; do
    [ "$(readlink "$root/etc/rc.d/${l}qpq-server-lite")" = "../init.d/qpq-server-lite" ] ||
        fail "no rc.d/${l}qpq-server-lite link"
done
ok "postinst: user qpq ($uid:$gid), /etc/qpq 0700, rc.d S95/K10 links"

run_postinst
[ "$(grep -c '^qpq:' "$root/etc/passwd")" = 1 ] || fail "postinst is not idempotent"
IPKG_INSTROOT="$root" sh "$info/$pkg.prerm" || fail "prerm exited $?"
[ ! -e "$root/etc/rc.d/S95qpq-server-lite" ] || fail "prerm left the rc.d link"
[ -d "$root/etc/qpq" ] || fail "prerm removed the data directory"
run_postinst
[ -L "$root/etc/rc.d/S95qpq-server-lite" ] || fail "postinst did not restore the rc.d link"
ok "postinst idempotent; prerm disables and keeps the data"
echo "uid=$uid gid=$gid"
