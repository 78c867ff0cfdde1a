#!/usr/bin/env bash
# torchrun: one node, or several nodes through a rendezvous. DeepSpeed ZeRO (distributed.zero_stage,
# default 2) trains the model; see launch/common.sh for the knobs.
#
#   launch/torchrun.sh configs/tiny.yaml                                  # this node's GPUs (CPU: 2 processes)
#   NGPU=8 launch/torchrun.sh configs/blt_1b.yaml distributed.zero_stage=3
#   # two nodes, static ranks: run on each node with its NODE_RANK
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh configs/blt_1b.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh configs/blt_1b.yaml
#   # or elastic c10d rendezvous (node ranks by arrival): RDZV_ID=myjob on every node
#   DRY_RUN=1 NNODES=8 NGPU=8 launch/torchrun.sh configs/blt_8b.yaml      # plan only
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ -n "${RDZV_ID:-}" ]; then
    where=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
else
    where=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NGPU" "${where[@]}"
     -m blt train "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
[ "${DRY_RUN:-0}" = 1 ] && dry_run "${cmd[@]}"
exec "${cmd[@]}"
