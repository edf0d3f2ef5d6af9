#!/bin/sh
# /init of the vhost-user-blk test guest (busybox sh, runs as PID 1).
#
# Copied into the initramfs by build-guest.sh. It:
#   1. mounts proc, sys and devtmpfs,
#   2. insmods the modules listed (in dependency order) in /etc/vub/modules.list,
#   3. waits for /dev/vda (timeout: vub.devwait=SECONDS on the kernel cmdline, default 30),
#   4. sources /workload.sh in a subshell (the per-run script, appended by the launcher as
#      an extra cpio archive after initramfs.cpio.gz), then, if vub.shell is on the kernel
#      cmdline, runs an interactive shell on the console,
#   5. prints "@@GUEST-DONE rc=N" and powers off.  If poweroff fails, init exits, the
#      kernel panics and (panic=-1 + QEMU -no-reboot) QEMU exits anyway.
#
# Console protocol (every marker is alone on its line and starts with "@@"):
#   @@INIT-START                         init is running
#   @@INSMOD-FAIL NAME rc=N              a module failed to load
#   @@DISK name=vda size=BYTES queues=N  the disk appeared (or @@DISK-MISSING after the timeout)
#   @@WORKLOAD-START                     about to source /workload.sh (or @@WORKLOAD-MISSING)
#   @@RESULT-BEGIN NAME                  base64 lines of a result follow ...
#   @@RESULT-END NAME rc=N               ... end of the result, N is the command's exit code
#   @@LOG text                           free-form progress message from `log`
#   @@WORKLOAD-END rc=N                  the workload's exit status
#   @@GUEST-DONE rc=N                    last line before poweroff
#
# Helpers available to /workload.sh:
#   result NAME CMD [ARGS...]   run CMD (stdin </dev/null), capture stdout+stderr and the
#                               exit code, print them base64-encoded between RESULT markers;
#                               returns CMD's exit code.
#   result_file NAME PATH       emit the content of PATH as a result (rc=0, or rc=1 and
#                               empty content if PATH is missing).
#   result_sh NAME 'SHELL CODE' like result, but runs the string with `sh -c` (the
#                               real-tool functions below are defined there too).
#   log TEXT...                 print "@@LOG TEXT".
#   marker TEXT...              print "@@TEXT" (custom markers for the host side).
# Busybox's sh runs its own applets whatever $PATH says; /etc/vub/real-tools.sh defines
# shell functions so that `blkdiscard` (util-linux: has -z) and `mke2fs` (e2fsprogs) run
# the real tools. mkfs.ext4, e2fsck and fio are not applets. Under `timeout`, `xargs` or
# `env` use full paths (/usr/sbin/blkdiscard, /usr/sbin/mke2fs).
# Variables: VUB_DISK (/dev/vda, empty if missing), VUB_DISK_SIZE (bytes),
#            VUB_NPROC (online CPUs), VUB_CMDLINE (/proc/cmdline).

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /run /mnt
mount -t tmpfs tmpfs /tmp
# Only emergency messages on the console: keep the protocol lines clean.
dmesg -n 1 2>/dev/null

echo "@@INIT-START"

VUB_CMDLINE=$(cat /proc/cmdline)
devwait=30
want_shell=
for arg in $VUB_CMDLINE; do
    case "$arg" in
        vub.devwait=*) devwait=${arg#vub.devwait=} ;;
        vub.shell) want_shell=1 ;;
    esac
done

if [ -f /etc/vub/modules.list ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod.ko" 2>/tmp/insmod.err
        rc=$?
        if [ $rc -ne 0 ] && ! grep -q 'File exists' /tmp/insmod.err; then
            echo "@@INSMOD-FAIL $mod rc=$rc $(cat /tmp/insmod.err)"
        fi
    done </etc/vub/modules.list
fi

# Real util-linux/e2fsprogs tools instead of same-named busybox applets (blkdiscard, mke2fs).
[ -f /etc/vub/real-tools.sh ] && . /etc/vub/real-tools.sh

log() { echo "@@LOG $*"; }
marker() { echo "@@$*"; }

result() {
    _name=$1
    shift
    _out=/tmp/.result.$(printf '%s' "$_name" | tr -c 'A-Za-z0-9_.-' _)
    "$@" </dev/null >"$_out" 2>&1
    _rc=$?
    echo "@@RESULT-BEGIN $_name"
    base64 "$_out"
    echo "@@RESULT-END $_name rc=$_rc"
    rm -f "$_out"
    return $_rc
}

result_sh() {
    _n=$1
    shift
    result "$_n" sh -c ". /etc/vub/real-tools.sh; $*"
}

result_file() {
    echo "@@RESULT-BEGIN $1"
    if [ -f "$2" ]; then
        base64 "$2"
        echo "@@RESULT-END $1 rc=0"
        return 0
    fi
    echo "@@RESULT-END $1 rc=1"
    return 1
}

# Wait for the virtio-blk disk (devtmpfs creates the node when the driver registers it).
VUB_DISK=
VUB_DISK_SIZE=0
i=0
limit=$((devwait * 10))
while [ $i -lt $limit ]; do
    if [ -b /dev/vda ]; then
        VUB_DISK=/dev/vda
        break
    fi
    usleep 100000
    i=$((i + 1))
done
if [ -n "$VUB_DISK" ]; then
    VUB_DISK_SIZE=$(($(cat /sys/block/vda/size) * 512))
    queues=$(ls /sys/block/vda/mq 2>/dev/null | wc -l)
    echo "@@DISK name=vda size=$VUB_DISK_SIZE queues=$queues"
else
    echo "@@DISK-MISSING after ${devwait}s"
fi
VUB_NPROC=$(nproc)
export VUB_DISK VUB_DISK_SIZE VUB_NPROC VUB_CMDLINE

wrc=0
if [ -f /workload.sh ]; then
    echo "@@WORKLOAD-START"
    (cd /tmp && . /workload.sh)
    wrc=$?
    echo "@@WORKLOAD-END rc=$wrc"
else
    echo "@@WORKLOAD-MISSING"
    wrc=127
fi

if [ -n "$want_shell" ]; then
    # Interactive debugging (vub.shell on the kernel cmdline): poweroff when the shell exits.
    echo "@@SHELL (exit the shell to power off)"
    setsid cttyhack sh -l
fi

sync
echo "@@GUEST-DONE rc=$wrc"
poweroff -f
# Not reached unless poweroff failed: exiting PID 1 panics the kernel, panic=-1 reboots at
# once and QEMU's -no-reboot turns that into an exit.
sleep 1
exit $wrc
