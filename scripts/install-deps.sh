#!/usr/bin/env bash
# Installs, on Debian 12, everything vblk's build and tests need besides Node.js itself:
# the real peers (QEMU, qemu-storage-daemon), what scripts/guest/build.sh packs into the
# test guest, and node-gyp's toolchain. Idempotent: when every package is installed and
# apt knows the guest kernel, it changes nothing and runs no apt command.
set -euo pipefail

packages=(
	qemu-system-x86    # qemu-system-x86_64: the VM that uses `vblk serve`
	qemu-system-common # qemu-storage-daemon: the vhost-user-blk device our driver drives
	qemu-utils         # qemu-img, and qemu-nbd: an NBD server for the NBD backend's tests
	nbdkit             # the other NBD server the NBD backend is tested against (memory plugin, delay and error filters)
	libnbd-bin         # nbdinfo, nbdcopy: an independent NBD client to check what vblk reads and writes
	busybox-static     # the guest's userland (sh, mount, insmod, fstrim, dd …)
	e2fsprogs          # mkfs.ext4, e2fsck, debugfs, resize2fs in the guest
	fio                # I/O with verification, in the guest and on the host
	prometheus         # promtool: checks what `vblk serve --metrics` exposes
	cpio               # packs the guest initramfs
	zstd               # compresses it
	util-linux         # flock (build.sh) and setpriv (guest.ts), usually present already
	python3            # node-gyp
	make               # node-gyp
	g++                # node-gyp
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done

# scripts/guest/build.sh downloads the kernel with apt-get download, which needs package
# lists; container images often ship without them.
need_lists=
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || need_lists=1

if [ ${#missing[@]} -eq 0 ] && [ -z "$need_lists" ]; then
	echo "install-deps: all ${#packages[@]} packages installed, apt knows linux-image-cloud-amd64: nothing to do"
	exit 0
fi

# As root, apt directly; otherwise through sudo when there is one.
as_root=()
if [ "$(id -u)" -ne 0 ]; then
	if ! command -v sudo >/dev/null 2>&1; then
		echo "install-deps: run as root (or install sudo) to install: ${missing[*]:-(none)}${need_lists:+; and to run apt-get update}" >&2
		exit 1
	fi
	as_root=(sudo)
fi

echo "install-deps: apt-get update"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: apt-get install ${missing[*]}"
	"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "install-deps: done"
