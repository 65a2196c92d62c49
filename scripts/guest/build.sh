#!/usr/bin/env bash
# Builds (or reuses) the guest that every end-to-end test boots under QEMU: Debian's
# cloud kernel and a base initramfs with busybox, e2fsprogs, fio and the virtio modules.
#
#   scripts/guest/build.sh            prints  kernel=PATH  and  initrd=PATH  on stdout
#
# Progress goes to stderr. The cache lives in $VBLK_GUEST_CACHE (default .cache/guest/
# under the repository root). The kernel comes from apt only (apt-get download, the
# version linux-image-cloud-amd64 depends on); the base initramfs is named after a hash
# of everything that goes into it, so it is rebuilt only when an input changes. Tests
# append their own script as a second cpio archive (guest.ts), never touching the base.
set -euo pipefail
# e2fsprogs lives in /usr/sbin, which is not on an ordinary user's PATH.
export PATH=$PATH:/usr/sbin:/sbin

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${VBLK_GUEST_CACHE:-$root/.cache/guest}
# Bump when the layout of the initramfs changes in a way the hashed inputs do not show.
format=1
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
tools=(mke2fs e2fsck debugfs resize2fs tune2fs dumpe2fs fio)

log() { echo "guest: $*" >&2; }
die() { echo "guest: error: $*" >&2; exit 1; }

for t in busybox cpio zstd apt-get dpkg flock sha256sum "${tools[@]}"; do
	command -v "$t" >/dev/null || die "$t not found: run scripts/install-deps.sh"
done

mkdir -p "$cache"
# Two test files may ask for the guest at the same time: one builds, the other waits.
exec 9>"$cache/.lock"
flock 9

# ---- kernel -------------------------------------------------------------------------

# Resolves the cloud kernel package and version apt would install today, as "PKG VERSION";
# empty when apt has no package lists (then a kernel already in the cache is used). The
# meta package pins the exact version ("Depends: linux-image-6.1.0-N-cloud-amd64 (= V)").
# apt-cache takes half a second, so the answer is kept until the package lists change.
resolve_kernel() {
	local saved=$cache/kernel.resolved
	if [ -s "$saved" ] && [ -z "$(find /var/lib/apt/lists -maxdepth 1 -newer "$saved" -print -quit 2>/dev/null)" ]; then
		cat "$saved"
		return 0
	fi
	apt-cache show --no-all-versions linux-image-cloud-amd64 2>/dev/null |
		sed -n 's/^Depends:.*\(linux-image-[0-9][^ ]*-cloud-amd64\) (= \([^)]*\)).*/\1 \2/p' | head -n1 >"$saved.tmp"
	mv "$saved.tmp" "$saved"
	cat "$saved"
}

fetch_kernel() {
	local pkg=$1 ver=$2 dir=$3 tmp kver m ko
	tmp=$(mktemp -d "$cache/tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	log "downloading $pkg $ver with apt-get (about 27 MB)"
	# As root apt drops to the _apt user, which cannot write into our cache; downloading
	# as root is what we want here and silences that warning.
	(cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$pkg=$ver" >&2) ||
		die "apt-get download $pkg=$ver failed (run scripts/install-deps.sh, which runs apt-get update)"
	log "unpacking $pkg"
	dpkg -x "$tmp"/*.deb "$tmp/x"
	kver=${pkg#linux-image-}
	mkdir -p "$tmp/out/modules"
	cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
	for m in "${modules[@]}"; do
		ko=$(find "$tmp/x/lib/modules/$kver" -name "$m.ko*" | head -n1)
		[ -n "$ko" ] || die "module $m not found in $pkg"
		# Bookworm's kernels ship plain .ko files; busybox insmod cannot load compressed
		# ones, so a kernel built with module compression is decompressed here.
		case $ko in
		*.ko) cp "$ko" "$tmp/out/modules/$m.ko" ;;
		*.ko.xz) xz -dc "$ko" >"$tmp/out/modules/$m.ko" ;;
		*.ko.zst) zstd -qdc "$ko" >"$tmp/out/modules/$m.ko" ;;
		*) die "cannot load $ko" ;;
		esac
	done
	echo "$pkg $ver" >"$tmp/out/version"
	rm -rf "$dir"
	mkdir -p "$(dirname "$dir")"
	mv "$tmp/out" "$dir"
	rm -rf "$tmp"
	trap - EXIT
}

read -r kpkg kver_deb < <(resolve_kernel) || true
if [ -n "${kpkg:-}" ]; then
	kdir=$cache/kernel/${kpkg}_$kver_deb
	if [ ! -f "$kdir/version" ]; then
		fetch_kernel "$kpkg" "$kver_deb" "$kdir"
		# Keep only the kernel in use: each one is about 10 MB.
		find "$cache/kernel" -mindepth 1 -maxdepth 1 ! -path "$kdir" -exec rm -rf {} +
	fi
else
	kdir=$(find "$cache/kernel" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort -V | tail -n1)
	[ -n "$kdir" ] || die "apt does not know linux-image-cloud-amd64: run scripts/install-deps.sh"
	log "apt has no package lists; using the cached $(cat "$kdir/version")"
fi

# ---- base initramfs -----------------------------------------------------------------

# The manifest: one "GUEST-PATH SOURCE-PATH" line per file, sorted. Libraries keep the
# path ldd names them by (that is where the loader looks) with the content of the file
# the link resolves to.
manifest() {
	local t bin
	echo "/init $here/init.sh"
	echo "/bin/busybox $(command -v busybox)"
	echo "/etc/mke2fs.conf /etc/mke2fs.conf"
	for m in "${modules[@]}"; do echo "/lib/modules/$m.ko $kdir/modules/$m.ko"; done
	for t in "${tools[@]}"; do
		bin=$(readlink -f "$(command -v "$t")")
		echo "/usr/bin/$t $bin"
		# "not a dynamic executable" (a static busybox) is not an error here.
		ldd "$bin" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
			while read -r lib; do echo "$lib $(readlink -f "$lib")"; done
	done
} 

list=$(manifest | LC_ALL=C sort -u)
hash=$( {
	echo "format $format"
	echo "$list"
	# Size and modification time of each source: a package upgrade or an edit changes
	# them (dpkg installs files with the mtime they have in the package), and stat is
	# instant where hashing the 90 MB of contents takes a noticeable part of a second.
	cut -d' ' -f2 <<<"$list" | xargs stat -L -c '%s %Y' 
} | sha256sum | cut -c1-16)
initrd=$cache/base-$hash.cpio.zst

if [ ! -f "$initrd" ]; then
	log "building base initramfs $hash"
	stage=$(mktemp -d "$cache/tmp.XXXXXX")
	trap 'rm -rf "$stage"' EXIT
	mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,root,lib/modules}
	while read -r dst src; do
		mkdir -p "$stage$(dirname "$dst")"
		cp "$src" "$stage$dst"
	done <<<"$list"
	# The applet links, except where the real tool is installed: busybox's mke2fs is not
	# the e2fsprogs one the tests mean.
	for applet in $(busybox --list-full); do
		name=${applet##*/}
		[ -e "$stage/usr/bin/$name" ] || [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
	done
	# mke2fs and e2fsck pick the filesystem type from the name they are called by.
	for fs in ext2 ext3 ext4; do
		ln -s mke2fs "$stage/usr/bin/mkfs.$fs"
		ln -s e2fsck "$stage/usr/bin/fsck.$fs"
	done
	chmod 755 "$stage/init"
	log "packing $(du -sh "$stage" | cut -f1) into $initrd"
	# zstd: the kernel decompresses it several times faster than gzip, which matters
	# under TCG where every guest instruction is emulated.
	(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
		zstd -q -T0 -10 >"$initrd.tmp"
	mv "$initrd.tmp" "$initrd"
	rm -rf "$stage"
	trap - EXIT
	find "$cache" -maxdepth 1 -name 'base-*.cpio.*' ! -path "$initrd" -delete
	log "base initramfs ready ($(du -h "$initrd" | cut -f1))"
fi

echo "kernel=$kdir/vmlinuz"
echo "initrd=$initrd"
