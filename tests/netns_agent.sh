#!/bin/sh
# Launch agent for tests/test_multihost.py, used by Open MPI/PRRTE instead of ssh
# (--prtemca plm_ssh_agent tests/netns_agent.sh). PRRTE calls it like ssh: `AGENT HOST COMMAND...`.
# HOST is an address 10.213.0.N of the test's private subnet; the command runs in the network
# namespace ${TESTS_NETNS_PREFIX}hN (made by the test) with its own UTS namespace whose hostname
# is that namespace's name, so every fake host has its own network stack and its own hostname.
set -eu
host="$1"; shift
prefix="${TESTS_NETNS_PREFIX:?TESTS_NETNS_PREFIX not set (netns_agent.sh is for tests/test_multihost.py)}"
case "$host" in
    10.213.0.[0-9]|10.213.0.[0-9][0-9]|10.213.0.[0-9][0-9][0-9]) ;;
    *) echo "netns_agent.sh: unknown host '$host' (only 10.213.0.N test hosts)" >&2; exit 255 ;;
esac
ns="${prefix}h${host##*.}"
# like ssh: the remote shell interprets the command line
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$ns" "$*"
