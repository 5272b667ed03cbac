#!/usr/bin/env sh
# Run a command in a fresh network namespace that has only the loopback interface, when
# this machine allows it (root, util-linux unshare); otherwise run it as it is.
#
# Why: Ray 2.60 binds several of its gRPC servers to every interface even when its node
# address is 127.0.0.1. Inside this namespace "every interface" is loopback, so nothing a
# test starts can be reached from, or talk to, anything but 127.0.0.1.
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' sh "$@"
fi
echo "loopback_only: no network namespace here; running with the host network" >&2
exec "$@"
