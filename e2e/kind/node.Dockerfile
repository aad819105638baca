# A kind node image whose nodes each have their own boot ID, new at every container start.
# kind nodes share the host's kernel, so they all report the host's boot ID, and a restarted
# node reports the same one: twosite rightly keeps such a node fenced (it never rebooted). This
# image bind-mounts a fresh UUID over /proc/sys/kernel/random/boot_id before systemd starts (as
# kind does for product_uuid), so the kubelet reports it, and copies it to
# /run/twosite/boot_id, where the agent reads it (agent.bootIdFile: the agent's pod has its own
# /proc). `docker stop` + `docker start` of a node container is then a reboot.
# The base is the node image of the pinned kind release (see up.sh).
ARG NODE_IMAGE=kindest/node:v1.33.1
FROM ${NODE_IMAGE}
COPY boot-id-entrypoint.sh /usr/local/bin/twosite-boot-id
RUN chmod 0755 /usr/local/bin/twosite-boot-id
ENTRYPOINT ["/usr/local/bin/twosite-boot-id", "/usr/local/bin/entrypoint", "/sbin/init"]
