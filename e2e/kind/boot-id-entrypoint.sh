#!/bin/sh
# Runs first in a kind node container (node.Dockerfile): a new boot ID for this start, then
# kind's own entrypoint.
set -eu
uuid=$(cat /proc/sys/kernel/random/uuid)
echo "$uuid" > /kind/boot_id
mount --bind /kind/boot_id /proc/sys/kernel/random/boot_id
mkdir -p /run/twosite
echo "$uuid" > /run/twosite/boot_id
echo "twosite-boot-id: boot ID $uuid" >&2
exec "$@"
