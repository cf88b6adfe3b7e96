#!/usr/bin/env bash
# Builds the Slipway image with podman from no registry at all: a minimal Debian bookworm made
# with debootstrap from Debian's mirror (cached as target/container/rootfs-bookworm.tar), the
# `slipway` user, and every Slipway binary.
#
#   deploy/container/build.sh [--bin-dir target/release] [--tag slipway:<version>]
#
# Needs root (debootstrap, podman) and the binaries built (`cargo build --release`).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin_dir=target/release
tag="slipway:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p target/container
cache=target/container/rootfs-bookworm.tar
if [ ! -f "$cache" ]; then
    echo "build.sh: making a minimal Debian bookworm with debootstrap" >&2
    tmp=$(mktemp -d target/container/debootstrap.XXXXXX)
    debootstrap --variant=minbase --include=ca-certificates,git bookworm "$tmp/root" http://deb.debian.org/debian >&2
    # What an image does not need: package caches, documentation, translations.
    rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/* \
        "$tmp"/root/usr/share/doc "$tmp"/root/usr/share/man "$tmp"/root/usr/share/info \
        "$tmp"/root/usr/share/locale
    tar -C "$tmp/root" -cf "$cache.part" .
    mv "$cache.part" "$cache"
    rm -rf "$tmp"
fi
ctx=$(mktemp -d target/container/context.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs" "$ctx/bin"
tar -C "$ctx/rootfs" -xf "$cache"
echo "slipway:x:10001:10001:Slipway:/var/lib/slipway:/usr/sbin/nologin" >> "$ctx/rootfs/etc/passwd"
echo "slipway:x:10001:" >> "$ctx/rootfs/etc/group"
mkdir -p "$ctx/rootfs/var/lib/slipway/work"
chown -R 10001:10001 "$ctx/rootfs/var/lib/slipway"
for b in slipway slipway-conductor slipway-builder slipway-tester slipway-deployer slipway-monitor \
    slipway-approval slipway-model-evaluator slipway-perf-regression slipway-cost-estimator; do
    [ -x "$bin_dir/$b" ] || { echo "build.sh: $bin_dir/$b missing (cargo build --release)" >&2; exit 1; }
    # Debug information stays with the build, not in the image.
    strip --strip-debug -o "$ctx/bin/$b" "$bin_dir/$b"
done
cp deploy/container/Containerfile "$ctx/Containerfile"
podman build --quiet --tag "$tag" --file "$ctx/Containerfile" "$ctx"
echo "$tag"
