#!/bin/sh
# Builds, once, the local Debian trixie root filesystem that equals the step image
# (same package list, same install script) plus the PostgreSQL 17 server used as
# the throwaway target. Cached by a hash of the inputs; prints nothing when fresh.
# With no container engine here, this is where the tests run pgcopydb 0.17.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cache=${DB_UPGRADE_CACHE:-/var/cache/db-upgrade}
hash=$(cat "$here/install-packages.sh" "$here/packages.txt" "$here/packages-local.txt" | sha256sum | cut -c1-12)
dest="$cache/rootfs-$hash"
if [ -f "$dest/.db-upgrade-complete" ]; then
  ln -sfn "rootfs-$hash" "$cache/rootfs"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "build-rootfs: building $dest needs root (debootstrap, chroot); run 'sudo make rootfs'" >&2
  exit 1
fi
mkdir -p "$cache"
rm -rf "$dest.tmp"
echo "build-rootfs: debootstrap trixie into $dest (about a minute)"
debootstrap --variant=minbase trixie "$dest.tmp" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
  || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
mkdir -p "$dest.tmp/tmp/image"
cp "$here/install-packages.sh" "$here/packages.txt" "$here/packages-local.txt" "$dest.tmp/tmp/image/"
cp /etc/resolv.conf "$dest.tmp/etc/resolv.conf"
chroot "$dest.tmp" /bin/sh /tmp/image/install-packages.sh /tmp/image/packages.txt /tmp/image/packages-local.txt \
  >"$cache/install.log" 2>&1 || { tail -20 "$cache/install.log" >&2; exit 1; }
rm -rf "$dest.tmp/tmp/image"
chmod 755 "$cache" "$dest.tmp"
touch "$dest.tmp/.db-upgrade-complete"
mv "$dest.tmp" "$dest"
ln -sfn "rootfs-$hash" "$cache/rootfs"
echo "build-rootfs: ready at $cache/rootfs"
