#!/usr/bin/env bash
# Attach a QEMU guest to the project's vhost-user-blk server, re-connecting when the server
# restarts.
#
#   vhost-user-blk --socket /tmp/vhost-user-blk.sock --image disk.img   # 1. the server
#   qemu-configs/qemu-vhost-user-blk-reconnect.sh                       # 2. the guest
#
# With reconnect=1 on the socket chardev QEMU may start before the server listens, and
# re-connects (every second) after the server goes away, then sends the memory table and
# vring state again; the guest's I/O stalls meanwhile. Requests that were in flight when
# the server died are only recovered if the server implements the inflight-fd feature.
# Boots the e2e test guest (qemu-configs/build-guest.sh) with an interactive busybox shell
# on this terminal (exit the shell, or Ctrl-A X, to quit); the disk is /dev/vda. To boot
# your own OS instead, replace -kernel/-initrd/-append with its boot disk.
# PACKED=on adds packed=on to the device (the packed virtqueue; the guest falls back to split
# rings if the server does not offer it: character 34 of /sys/block/vda/device/features
# says which). Extra arguments are appended to the QEMU command line.
set -euo pipefail
SOCK=${SOCK:-/tmp/vhost-user-blk.sock}
MEM=${MEM:-1G}                          # guest RAM; vhost-user needs it shared (see README)
ACCEL=${ACCEL:-tcg,thread=multi}        # ACCEL=kvm where KVM works
PACKED=${PACKED:-off}                   # PACKED=on: offer the guest the packed virtqueue
GUEST=${GUEST:-${VUB_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-blk/guest}}

exec qemu-system-x86_64 \
    -machine q35 -accel "$ACCEL" -cpu max -smp 1 \
    -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on \
    -numa node,memdev=mem \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 vub.shell" \
    -display none -nodefaults -no-reboot -serial mon:stdio \
    -chardev socket,id=vub0,path="$SOCK",reconnect=1 \
    -device vhost-user-blk-pci,chardev=vub0,num-queues=1,packed="$PACKED" \
    "$@"
