#!/usr/bin/env bash
# Build the Linux test guest (vmlinuz + initramfs.cpio.gz) for the vhost-user-blk e2e tests.
#
# Usage: build-guest.sh [--force] [OUTDIR]
#   OUTDIR defaults to $VUB_GUEST_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-blk/guest.
#
# Everything comes from Debian packages: the kernel is `apt-get download`ed (the versioned
# linux-image-*-amd64 package behind linux-image-amd64), the user space is copied from the
# host (busybox-static, fio, util-linux's blkdiscard, e2fsprogs' mke2fs/e2fsck, with their
# shared libraries and the dynamic loader). /init is guest-init.sh (next to this script).
#
# Host packages needed (Debian 12):
#   apt-get install qemu-system-x86 qemu-utils qemu-system-common fio busybox-static cpio \
#       e2fsprogs util-linux zstd xz-utils kmod
# plus, normally already present: apt, dpkg, gzip, coreutils, findutils, libc-bin (ldd).
# Nothing further is needed.
#
# Environment:
#   VUB_GUEST_DIR      default OUTDIR
#   VUB_KERNEL_DEB     use this linux-image .deb instead of downloading one
#   VUB_KERNEL_PKG     versioned kernel package to download (default: resolved from
#                      linux-image-amd64's candidate)
#   VUB_GUEST_FORCE=1  rebuild even if the stamp matches (same as --force)
#
# Cache: OUTDIR/stamp records the inputs (kernel package and version, versions of the
# copied host packages, sha256 of this script and of guest-init.sh). When it matches the
# current inputs the script exits at once without rebuilding.
set -euo pipefail

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

force=${VUB_GUEST_FORCE:-0}
outdir=
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        -*) die "unknown option: $arg" ;;
        *) outdir=$arg ;;
    esac
done
home=${HOME:-$(cd ~ && pwd)}
outdir=${outdir:-${VUB_GUEST_DIR:-${XDG_CACHE_HOME:-$home/.cache}/vhost-user-blk/guest}}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
init_src=$here/guest-init.sh
[ -f "$init_src" ] || die "missing $init_src"

for tool in apt-get apt-cache dpkg-deb dpkg-query ldd cpio gzip modinfo sha256sum busybox \
    fio blkdiscard mke2fs e2fsck flock truncate awk; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (see the package list at the top of $0)"
done
bb=$(command -v busybox)
ldd "$bb" >/dev/null 2>&1 && die "$bb is dynamically linked: install busybox-static"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

# Serialise concurrent builds (parallel test sessions share the cache).
exec 9>"$outdir/.lock"
flock 9

# ---------------------------------------------------------------- inputs / stamp
pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo missing; }

resolve_kernel() {
    # Prints "PACKAGE VERSION" of the kernel to use, or fails.
    if [ -n "${VUB_KERNEL_DEB:-}" ]; then
        [ -f "$VUB_KERNEL_DEB" ] || die "VUB_KERNEL_DEB=$VUB_KERNEL_DEB does not exist"
        echo "$(dpkg-deb -f "$VUB_KERNEL_DEB" Package) $(dpkg-deb -f "$VUB_KERNEL_DEB" Version)"
        return 0
    fi
    local pkg=${VUB_KERNEL_PKG:-} ver= dep
    if [ -z "$pkg" ]; then
        # One apt-cache call (~1 s each): the candidate's "Depends:" pins the versioned
        # package, e.g. "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
        dep=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null \
            | sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*-amd64\)\( (= \([^)]*\))\)\{0,1\}.*/\1 \3/p')
        dep=${dep%%$'\n'*}
        read -r pkg ver <<<"$dep" || true
        [ -n "$pkg" ] || return 1
    fi
    if [ -z "$ver" ]; then
        ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p')
        ver=${ver%%$'\n'*}
    fi
    [ -n "$ver" ] || return 1
    echo "$pkg $ver"
}

kernel=
if ! kernel=$(resolve_kernel); then
    if [ -f "$outdir/stamp" ] && [ -f "$outdir/vmlinuz" ] && [ -f "$outdir/initramfs.cpio.gz" ] \
        && [ "$force" != 1 ]; then
        log "cannot resolve linux-image-amd64 (no apt lists?); keeping the existing guest"
        exit 0
    fi
    if [ "$(id -u)" = 0 ]; then
        log "apt lists missing or stale: running apt-get update"
        apt-get update -qq >&2 || true
    fi
    kernel=$(resolve_kernel) \
        || die "cannot resolve the kernel package behind linux-image-amd64 (run apt-get update)"
fi
read -r kpkg kver <<<"$kernel"

stamp_now=$(cat <<EOF
kernel_package=$kpkg
kernel_version=$kver
busybox-static=$(pkg_version busybox-static)
fio=$(pkg_version fio)
util-linux=$(pkg_version util-linux)
e2fsprogs=$(pkg_version e2fsprogs)
libc6=$(pkg_version libc6)
build-guest.sh=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)
guest-init.sh=$(sha256sum <"$init_src" | cut -d' ' -f1)
EOF
)

if [ "$force" != 1 ] && [ -f "$outdir/stamp" ] && [ -f "$outdir/vmlinuz" ] \
    && [ -f "$outdir/initramfs.cpio.gz" ] && [ "$(cat "$outdir/stamp")" = "$stamp_now" ]; then
    log "up to date: $outdir ($kpkg $kver)"
    exit 0
fi

# ---------------------------------------------------------------- build
t0=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/vub-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building in $work -> $outdir ($kpkg $kver)"

# 1. kernel package
if [ -n "${VUB_KERNEL_DEB:-}" ]; then
    deb=$VUB_KERNEL_DEB
else
    mkdir "$work/dl"
    apt_opts=()
    [ "$(id -u)" = 0 ] && apt_opts=(-o APT::Sandbox::User=root)
    (cd "$work/dl" && apt-get download -q "${apt_opts[@]}" "$kpkg=$kver" >&2) \
        || die "apt-get download $kpkg=$kver failed"
    deb=$(ls "$work"/dl/*.deb)
fi
dpkg-deb -x "$deb" "$work/kpkg"
kroot=$work/kpkg
kdir=
for d in "$kroot"/lib/modules/* "$kroot"/usr/lib/modules/*; do
    [ -d "$d/kernel" ] && { kdir=$d; break; }
done
[ -n "$kdir" ] || die "no lib/modules in $deb"
vmlinuz=
for f in "$kroot"/boot/vmlinuz-*; do
    [ -f "$f" ] && { vmlinuz=$f; break; }
done
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"

# 2. modules, in dependency order (modinfo -F depends on the unpacked files)
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/vub,lib/modules,lib64,lib/x86_64-linux-gnu} \
    "$root"/{proc,sys,dev,tmp,run,mnt,root}

declare -A modfile=()
while IFS= read -r -d '' f; do
    name=$(basename "$f")
    name=${name%.xz}; name=${name%.zst}; name=${name%.gz}; name=${name%.ko}
    modfile[${name//-/_}]=$f
done < <(find "$kdir/kernel" -name '*.ko*' -print0)

builtin_mods=
[ -f "$kdir/modules.builtin" ] && builtin_mods=$(sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$kdir/modules.builtin")
is_builtin() { grep -qx "$1" <<<"$builtin_mods"; }

# wanted: "name:required" (optional ones are skipped if absent from this kernel)
wanted=(virtio_ring:1 virtio:1 virtio_pci_legacy_dev:0 virtio_pci_modern_dev:0 virtio_pci:1
    virtio_blk:1 crc16:1 crc32c_generic:1 libcrc32c:0 mbcache:1 jbd2:1 ext4:1)

declare -A state=()
order=()
mod_unpacked() { # NAME -> path of an uncompressed copy in $work/mods
    local n=$1 src=${modfile[$1]} dst=$work/mods/$1.ko
    mkdir -p "$work/mods"
    if [ ! -f "$dst" ]; then
        case "$src" in
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -qdc "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *) cp "$src" "$dst" ;;
        esac
    fi
    echo "$dst"
}
visit() {
    local n=$1 required=$2 dep deps
    case "${state[$n]:-}" in
        done) return 0 ;;
        active) die "module dependency cycle at $n" ;;
    esac
    if [ -z "${modfile[$n]:-}" ]; then
        if is_builtin "$n"; then
            state[$n]=done; return 0
        fi
        [ "$required" = 1 ] && die "module $n is neither in $deb nor built in"
        log "optional module $n not in this kernel: skipped"
        state[$n]=done; return 0
    fi
    state[$n]=active
    deps=$(modinfo -F depends "$(mod_unpacked "$n")")
    for dep in ${deps//,/ }; do
        visit "${dep//-/_}" 1
    done
    state[$n]=done
    order+=("$n")
}
for w in "${wanted[@]}"; do
    visit "${w%%:*}" "${w##*:}"
done
for n in "${order[@]}"; do
    cp "$work/mods/$n.ko" "$root/lib/modules/$n.ko"
done
printf '%s\n' "${order[@]}" >"$root/etc/vub/modules.list"
log "modules: ${order[*]}"

# 3. user space: busybox applets, then the real tools with their libraries
cp "$bb" "$root/bin/busybox"
real_tools=(/usr/bin/fio /usr/sbin/blkdiscard /usr/sbin/mke2fs /usr/sbin/e2fsck)
declare -A real_names=([mkfs.ext4]=1 [mkfs.ext2]=1 [mkfs.ext3]=1 [fsck.ext4]=1)
for t in "${real_tools[@]}"; do real_names[$(basename "$t")]=1; done
while IFS= read -r applet; do
    [ -n "$applet" ] || continue
    [ -n "${real_names[$(basename "$applet")]:-}" ] && continue
    [ -e "$root/$applet" ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done < <("$bb" --list-full)

declare -A copied=()
copy_file() { # host path -> same path in the image (dereferenced)
    local src=$1
    [ -n "${copied[$src]:-}" ] && return 0
    copied[$src]=1
    mkdir -p "$root/$(dirname "$src")"
    cp -L "$src" "$root/$src"
}
for t in "${real_tools[@]}"; do
    hostpath=$(command -v "$(basename "$t")" || true)
    [ -n "$hostpath" ] || hostpath=$t
    [ -x "$hostpath" ] || die "$t not found"
    copy_file "$t"
    [ "$hostpath" != "$t" ] && [ ! -e "$root/$t" ] && copy_file "$hostpath"
    # ldd lines: "libx.so => /path (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
    while IFS= read -r lib; do
        copy_file "$lib"
    done < <(ldd "$t" | awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }')
done
ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
ln -s mke2fs "$root/usr/sbin/mkfs.ext2"
ln -s e2fsck "$root/usr/sbin/fsck.ext4"
# Debian's busybox-static is built with FEATURE_SH_STANDALONE/PREFER_APPLETS: its sh runs
# its own applet for a command name whatever $PATH says (busybox blkdiscard has no -z).
# Shell functions win over applets, so /init (and result_sh) source one function per real
# tool whose name is also an applet. Elsewhere (timeout, xargs, env) use the full path.
applets=$("$bb" --list)
{
    echo "# generated by build-guest.sh: prefer the real tools over busybox applets"
    for t in "${real_tools[@]}" /usr/sbin/mkfs.ext4 /usr/sbin/mkfs.ext2 /usr/sbin/fsck.ext4; do
        n=$(basename "$t")
        if grep -qx -- "$n" <<<"$applets" && [[ $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
            echo "$n() { $t \"\$@\"; }"
        fi
    done
} >"$root/etc/vub/real-tools.sh"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
: >"$root/etc/fstab"
ln -s /proc/mounts "$root/etc/mtab"

# 4. /init
install -m 0755 "$init_src" "$root/init"

# 5. pack (newc, gzip). /dev/console comes from the kernel's built-in initramfs; /init
#    also re-opens it after mounting devtmpfs.
(
    cd "$root"
    find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0
) | gzip -6 >"$work/initramfs.cpio.gz"
# Zero-pad to 512 bytes: archives appended later (the per-run /workload.sh) must start at a
# 4-byte aligned offset for the kernel to find them.
truncate -s %512 "$work/initramfs.cpio.gz"

install -m 0644 "$vmlinuz" "$outdir/vmlinuz.tmp"
install -m 0644 "$work/initramfs.cpio.gz" "$outdir/initramfs.cpio.gz.tmp"
mv -f "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"
mv -f "$outdir/initramfs.cpio.gz.tmp" "$outdir/initramfs.cpio.gz"
printf '%s\n' "$(basename "$vmlinuz" | sed 's/^vmlinuz-//')" >"$outdir/kernel-release"
printf '%s\n' "$stamp_now" >"$outdir/stamp"
log "done in $(( $(date +%s) - t0 ))s: $outdir/vmlinuz $(du -h "$outdir/initramfs.cpio.gz" | cut -f1) initramfs"
