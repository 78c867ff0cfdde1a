#!/usr/bin/env bash
# accelerate launch with its DeepSpeed plugin (ZeRO-2 by default; ACCEL_CONFIG=launch/accelerate/zero3.yaml
# for ZeRO-3). The accelerate config chooses the ZeRO stage and offload; blt's config everything else.
#
#   launch/accelerate.sh configs/tiny.yaml
#   ACCEL_CONFIG=launch/accelerate/zero3.yaml NGPU=8 launch/accelerate.sh configs/blt_1b.yaml
#   NNODES=2 NODE_RANK=$i MASTER_ADDR=node0 launch/accelerate.sh configs/blt_1b.yaml   # on each node
#   DRY_RUN=1 launch/accelerate.sh configs/blt_1b.yaml
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCEL_CONFIG=${ACCEL_CONFIG:-launch/accelerate/zero2.yaml}
[ -f "$ACCEL_CONFIG" ] || { echo "launch: ACCEL_CONFIG '$ACCEL_CONFIG' not found" >&2; exit 2; }
stage=$(sed -n 's/^ *zero_stage: *\([0-3]\).*/\1/p' "$ACCEL_CONFIG")
cmd=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG"
     --num_processes $(( NNODES * NGPU )) --num_machines "$NNODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
     -m blt train "$CONFIG" distributed.engine=accelerate ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# the plan shows the accelerate config's stage, as the run will use it
[ "${DRY_RUN:-0}" = 1 ] && { OVERRIDES+=("distributed.zero_stage=$stage"); dry_run "${cmd[@]}"; }
exec "${cmd[@]}"
