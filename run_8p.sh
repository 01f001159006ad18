#!/usr/bin/env bash
# Train BiSeNetV1 on 8 devices of a host with torchrun, as the Ascend port's run_8p.sh did.
#   bash run_8p.sh --data_path=/data/cityscapes [any train.py flag]
#   bash run_8p.sh --data_path=/data/cityscapes --perf         # performance test, "FPS: N"
#   NPROC=4 bash run_8p.sh --data-path /data/cityscapes        # another device count
# Several hosts: run on each with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_8p.sh --data_path=/data/cityscapes
# The default per-device batch is 2, so 8 devices give the recipe's 16 images per iteration.
set -euo pipefail
cd "$(dirname "$0")"
args=(--batch-size 2)
for arg in "$@"; do
    case "$arg" in
        --data_path=*) args+=(--data-path "${arg#--data_path=}") ;;
        *) args+=("$arg") ;;
    esac
done
NPROC="${NPROC:-8}" NNODES="${NNODES:-1}" NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29500}"
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
exec python3 -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    train.py "${args[@]}"
