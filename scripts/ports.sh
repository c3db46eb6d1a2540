#!/usr/bin/env bash
# Sourced by the benchmark scripts: free local ports for the processes they start.
#
# A broker's shard i listens on port + i, so a broker needs a span of consecutive free ports.
# Spans are drawn below the kernel's ephemeral range: bind(0) and every outgoing connection take
# ports from that range, and one of them landing on port + 1 between the check and the broker's
# bind made CI fail once ("Address already in use" on shard 1).

# One free port (from the ephemeral range; nothing else listens there for long).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# free_port_span N: the first of N consecutive ports that are all free now, below the ephemeral range.
free_port_span() {
  python3 - "$1" <<'PY'
import random, socket, sys
span = int(sys.argv[1])
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    ephemeral_low = int(f.read().split()[0])
low = 10000
if ephemeral_low - span <= low:
    sys.exit(f"ports.sh: no room for {span} ports below the ephemeral range ({ephemeral_low})")
for _ in range(1000):
    base = random.randrange(low, ephemeral_low - span)
    held = []
    try:
        for port in range(base, base + span):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
        print(base)
        sys.exit(0)
    except OSError:
        pass
    finally:
        for s in held:
            s.close()
sys.exit(f"ports.sh: found no {span} consecutive free ports in 1000 tries")
PY
}

# The ports one broker needs: one per shard, and shards default to one per core.
broker_port_span() { free_port_span "${1:-$(nproc)}"; }
