#!/bin/sh
# PID 1 of the vblk test guest (busybox sh). It brings up just enough of a system for a
# test script to use the virtio disks, runs /test.sh (supplied per test as a second
# cpio archive appended to the base initramfs), reports its exit status on the console
# and powers off. scripts/guest/guest.ts parses the marker lines printed here:
#   VBLK-GUEST-BOOT          asks the host which boot this is (only with vblk.handshake)
#   VBLK-GUEST-START boot=N  /test.sh is starting
#   VBLK-GUEST-EXIT=N        /test.sh exited with status N
#   VBLK-GUEST-ERROR: ...    the guest could not get as far as running /test.sh
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
export HOME=/root

fail() {
	echo "VBLK-GUEST-ERROR: $*"
	poweroff -f
	# PID 1 must never exit: the kernel would panic and mask the message above.
	while :; do sleep 3600; done
}

mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mount -t tmpfs tmpfs /tmp || fail "mount /tmp"

# Module order matters: each needs the symbols of the ones before it, and there is no
# modprobe/modules.dep in this initramfs.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

# The host answers the boot handshake by writing a line on the console; without -echo the
# answer would be echoed into the log as a stray line.
stty -echo 2>/dev/null

# A reboot re-runs this same kernel and initramfs, so only the host knows how many boots
# came before: with vblk.handshake on the command line (guest.ts always adds it) init asks.
boot=1
case " $(cat /proc/cmdline) " in
*" vblk.handshake "*)
	echo "VBLK-GUEST-BOOT"
	read -r boot || fail "no boot number from the host"
	;;
esac

[ -f /test.sh ] || fail "no /test.sh in the initramfs"
cd /tmp
echo "VBLK-GUEST-START boot=$boot"
VBLK_BOOT=$boot sh /test.sh
rc=$?
# poweroff -f does not sync; a test that wrote through a filesystem without syncing still
# gets its data to the device before the power goes.
sync
echo "VBLK-GUEST-EXIT=$rc"
poweroff -f
while :; do sleep 3600; done
