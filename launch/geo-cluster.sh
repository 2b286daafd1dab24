#!/usr/bin/env bash
# An emulated geo-distributed cluster on this machine (root; iproute2), then a training run on it.
#
#   launch/geo-cluster.sh up --sites 2 --procs-per-site 2 --wan 100mbit --wan-delay 20ms
#   launch/geo-cluster.sh run -- torchrun -m dreamddp.train --config configs/gpt-tiny.toml
#   launch/geo-cluster.sh status      # qdiscs, delay mode, and a measured site-to-site rate
#   launch/geo-cluster.sh down        # removes every namespace, veth and qdisc; safe to repeat
#
# `run` starts the command once per site inside its namespace with MASTER_ADDR, MASTER_PORT,
# NNODES, NODE_RANK (and torchrun's PET_* twins) and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME set,
# so torchrun needs no multi-node flags. Knobs: --name (namespace prefix), --subnet, --lan.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" -m dreamddp.emulation.cluster "$@"
