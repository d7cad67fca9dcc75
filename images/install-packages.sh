#!/bin/sh
# Installs the packages named in the given list files (one name a line, # comments).
# Used by the Dockerfile and by the local root filesystem build: one list, one script.
set -eu
pkgs=$(cat "$@" | sed 's/#.*//' | tr -s ' \n' ' ')
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The postgresql-common package would create a default cluster: not wanted in
# an image or a rootfs whose servers the tests start themselves.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main.conf
apt-get install -y -qq --no-install-recommends $pkgs
apt-get clean
rm -rf /var/lib/apt/lists/*
# Refuse to produce an image with a pgcopydb that loses rows (0.10/0.11).
v=$(pgcopydb --version 2>&1 | sed -n 's/.*pgcopydb version \([0-9.]*\).*/\1/p' | head -1)
case "$v" in
  0.1[6-9]*|0.[2-9]*|[1-9]*) echo "pgcopydb $v installed" ;;
  *) echo "pgcopydb version '$v' is below 0.16: refusing" >&2; exit 1 ;;
esac
