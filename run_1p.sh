#!/usr/bin/env bash
# Train BiSeNetV1 on one device (NPU, GPU or CPU), as the Ascend port's run_1p.sh did.
#   bash run_1p.sh --data_path=/data/cityscapes [any train.py flag]
#   bash run_1p.sh --data_path=/data/cityscapes --perf       # performance test, ends "FPS: N"
# --data_path=X and --data-path X both work; every other flag goes to train.py unchanged.
set -euo pipefail
cd "$(dirname "$0")"
args=()
for arg in "$@"; do
    case "$arg" in
        --data_path=*) args+=(--data-path "${arg#--data_path=}") ;;
        *) args+=("$arg") ;;
    esac
done
# Ascend runtime settings recommended by torch_npu (harmless elsewhere).
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
exec python3 train.py "${args[@]}"
