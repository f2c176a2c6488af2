#!/usr/bin/env bash
# Makes the Debian bookworm base image the runtime stages of deploy/container/Dockerfile
# starts from, without a container registry: debootstrap (minbase) from the apt mirror
# this machine uses, imported into podman's local storage. Skips the work when the image
# is there. Needs root, debootstrap and podman (deploy/setup.sh installs them).
#
#   deploy/container/base-image.sh [IMAGE]     # default localhost/debian:bookworm
set -euo pipefail
image="${1:-localhost/debian:bookworm}"
if podman image exists "$image"; then
    echo "base-image: $image is there" >&2
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "base-image: debootstrap is missing: apt-get install debootstrap (deploy/setup.sh installs it)" >&2
    exit 1
}
# The mirror apt uses (deb822 or one-line sources), else Debian's CDN.
mirror=$(grep -hoE '^URIs:[[:space:]]*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
[[ -n "$mirror" ]] || mirror=$(grep -hoE '^deb[[:space:]]+\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -1 || true)
mirror="${mirror:-http://deb.debian.org/debian}"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base-image: debootstrap bookworm from $mirror (about half a minute)" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -f "$root.log"
tar -C "$root" -c . | podman import --message "debootstrap --variant=minbase bookworm" - "$image" >/dev/null
echo "base-image: $image imported" >&2
