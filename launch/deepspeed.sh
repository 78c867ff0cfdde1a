#!/usr/bin/env bash
# The deepspeed launcher: one node, or the nodes of a hostfile (it starts the other nodes over ssh/pdsh,
# so run this once, on the first node). See launch/common.sh for the knobs; HOSTFILE adds:
#
#   launch/deepspeed.sh configs/tiny.yaml                                 # this node
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/blt_1b.yaml distributed.zero_stage=3
#   DRY_RUN=1 HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/blt_8b.yaml
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hosts=()
if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || { echo "launch: HOSTFILE '$HOSTFILE' not found" >&2; exit 2; }
    NNODES=$(grep -cE '^[^#[:space:]]' "$HOSTFILE")
    NGPU=$(awk '/^[^#[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); print $i; exit } }' "$HOSTFILE")
    ON_CPU=0  # a hostfile lists GPU nodes
    hosts=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
    NNODES=1
    hosts=(--num_nodes 1 --master_port "$MASTER_PORT")
fi
# --num_accelerators: without it a CPU host counts as one device
cmd=("$PYTHON" -m deepspeed.launcher.runner "${hosts[@]}" --num_accelerators "$NGPU"
     --no_local_rank --module blt train "$CONFIG" distributed.engine=deepspeed ${OVERRIDES[@]+"${OVERRIDES[@]}"})
[ "${DRY_RUN:-0}" = 1 ] && dry_run "${cmd[@]}"
exec "${cmd[@]}"
