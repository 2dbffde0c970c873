#!/bin/busybox sh
# PID 1 of the icmp-guard test VM, written by `cargo xtask vm-run` / `vm-test`
# (xtask/src/vm/initramfs.rs fills in the placeholders).
#
# Contract with the host side (xtask/src/vm/qemu.rs):
#   ICMP_GUARD_VM_LSM=<contents of /sys/kernel/security/lsm>
#   ICMP_GUARD_VM_KERNEL=<uname -r>
#   ICMP_GUARD_VM_EXIT=<exit code of the command> run=<nonce of this boot>
# The host reads the verdict only from the EXIT line; a boot without it is a failure.

# The kernel may have started us without a console (our initramfs carries no
# device nodes so it can be packed without mknod): mount devtmpfs first, then
# point stdio at the serial console.
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

# Applets are linked at boot rather than at pack time: it keeps the archive
# small and never shadows a real binary that was included (existing files win).
/bin/busybox --install -s

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8

warn() { echo "ICMP_GUARD_VM_WARN: $*"; }
m() {
    mkdir -p "$3"
    mount -t "$1" "$2" "$3" || warn "could not mount $1 on $3"
}
m proc proc /proc
m sysfs sysfs /sys
m securityfs securityfs /sys/kernel/security
m bpf bpf /sys/fs/bpf
m tracefs tracefs /sys/kernel/tracing
m cgroup2 cgroup2 /sys/fs/cgroup
m tmpfs tmpfs /tmp
m tmpfs tmpfs /run
m devpts devpts /dev/pts
m tmpfs tmpfs /dev/shm
chmod 1777 /tmp /dev/shm

ip link set lo up || warn "could not bring lo up"
hostname -F /etc/hostname || warn "could not set the hostname"

echo "ICMP_GUARD_VM_LSM=$(cat /sys/kernel/security/lsm 2>/dev/null)"
echo "ICMP_GUARD_VM_KERNEL=$(uname -r)"

@ENV@
# Debian's busybox sh prefers its own applets over PATH for bare command names
# ("ping" would be busybox's ping, not the included iputils one): resolve the
# command through PATH ourselves and run it by its path.
run() {
    cmd=$1
    shift
    case $cmd in
    */*) ;;
    *)
        found=
        oldifs=$IFS
        IFS=:
        for d in $PATH; do
            if [ -x "$d/$cmd" ] && [ ! -d "$d/$cmd" ]; then
                found=$d/$cmd
                break
            fi
        done
        IFS=$oldifs
        [ -n "$found" ] || { echo "ICMP_GUARD_VM_WARN: $cmd not found in PATH"; return 127; }
        cmd=$found
        ;;
    esac
    "$cmd" "$@"
}

cd /root
echo @CMD_DISPLAY@
# stdin is /dev/null so that a test waiting on input fails instead of hanging
# until the host-side timeout.
run @CMD@ </dev/null
rc=$?
echo "ICMP_GUARD_VM_EXIT=$rc run=@NONCE@"
sync
# -f: we are PID 1; there is nothing to shut down in order. If this failed, init
# exiting panics the kernel, panic=-1 reboots and qemu -no-reboot exits anyway.
poweroff -f
