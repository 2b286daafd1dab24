#!/usr/bin/env bash
# Single-node launcher: torchrun with one process per local device (or CPU worker).
#
#   NPROC=2 CONFIG=configs/gpt-tiny.toml launch/run_train.sh --set train.algorithm=dreamddp
#
# Knobs: NPROC (processes on this node, default 2), CONFIG (TOML file), and any further
# arguments, passed to the trainer (e.g. --set train.link=100mbit,20ms).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/gpt-tiny.toml}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# A restarted gloo job must not read the previous attempt's addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    -m dreamddp.train --config "$CONFIG" "$@"
