# Sourced by the launchers: the environment knobs they share, and the dry run.
#   CONFIG       the blt YAML config (first argument of the launcher; default configs/tiny.yaml)
#   NGPU         processes (GPUs) per node (default: the GPUs nvidia-smi sees, else NGPU_CPU=2 CPU processes)
#   NNODES       nodes (default 1)            NODE_RANK    this node's rank (default 0)
#   MASTER_ADDR  rank 0's host (127.0.0.1)    MASTER_PORT  its port (29500)
#   PYTHON       the interpreter with blt installed (default: python3)
#   DRY_RUN=1    print the command and the plan (world size, DeepSpeed config, parameters, memory per
#                ZeRO stage) without starting anything
# Every argument after CONFIG is a key=value override, e.g. distributed.zero_stage=3 training.steps=100.
# Only rank 0 prints progress and metrics; any rank prints its own error.

set -euo pipefail
cd "${BLT_ROOT:-$(dirname "${BASH_SOURCE[0]}")/..}"

CONFIG=${1:-${CONFIG:-configs/tiny.yaml}}
[ $# -gt 0 ] && shift
OVERRIDES=("$@")
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ON_CPU=0
if [ -z "${NGPU:-}" ]; then
    NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    if [ "$NGPU" = 0 ]; then  # no GPU here and none asked for: CPU processes over gloo
        NGPU=${NGPU_CPU:-2}
        ON_CPU=1
        export DS_ACCELERATOR=cpu
    fi
fi
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NGPU > 0 ? CORES / NGPU : 1 ))}  # no oversubscription

[ -f "$CONFIG" ] || { echo "launch: config '$CONFIG' not found (give a YAML from configs/)" >&2; exit 2; }

# dry_run LAUNCH_COMMAND...: print what would run, then the plan; exits.
dry_run() {
    echo "would run on node $NODE_RANK of $NNODES ($NGPU processes per node, OMP_NUM_THREADS=$OMP_NUM_THREADS):"
    printf '  %q' "$@"; echo
    local cpu=()
    [ "$ON_CPU" = 1 ] && cpu=(--cpu)
    exec "$PYTHON" -m blt plan "$CONFIG" --nodes "$NNODES" --procs-per-node "$NGPU" "${cpu[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
}
