#!/usr/bin/env bash
# DeepSpeed + DreamDDP on one machine, with DeepSpeed's launcher or torchrun:
#
#   launch/deepspeed/run.sh --steps 50                      # torchrun, 2 processes
#   LAUNCHER=deepspeed NPROC=4 launch/deepspeed/run.sh      # the deepspeed launcher
#
# Knobs: LAUNCHER (torchrun | deepspeed), NPROC (processes, default 2), CONFIG (DeepSpeed JSON
# with a "dreamddp" section), PYTHON; further arguments go to launch/deepspeed/train.py.
# Without a GPU, DeepSpeed's CPU accelerator is used (DS_ACCELERATOR=cpu, gloo).
set -euo pipefail
cd "$(dirname "$0")/../.."
LAUNCHER="${LAUNCHER:-torchrun}"
NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-launch/deepspeed/ds_config.json}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
case "$LAUNCHER" in
    torchrun)
        exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
            launch/deepspeed/train.py --deepspeed_config "$CONFIG" "$@" ;;
    deepspeed)
        # The `deepspeed` command is this module; running it through $PYTHON keeps the venv.
        exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" \
            launch/deepspeed/train.py --deepspeed_config "$CONFIG" "$@" ;;
    *) echo "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2; exit 2 ;;
esac
