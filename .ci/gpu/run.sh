#!/usr/bin/env bash
# The GPU acceptance run (issue 28), from the repository root on a machine with an NVIDIA GPU
# and torch but no package registry; the wheels it installs are fetched beforehand, elsewhere:
#   pip download -d .ci/gpu/whl --no-deps --only-binary=:all: --python-version 3.12 \
#       av mmsegmentation==1.2.2 mmengine==0.10.7 ftfy wcwidth addict yapf platformdirs \
#       termcolor prettytable          # and mmcv-lite 2.1.0, built: pip wheel mmcv-lite==2.1.0
#   bash .ci/gpu/run.sh            # DRY=1 bash .ci/gpu/run.sh: the same plumbing on a CPU, tiny
# Everything it measures lands in $OUT: summary.txt (the figures), tests.log, train.log,
# bench.log. Phases are ordered by what matters most and stop at the deadline.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
DRY=${DRY:-0}
DEADLINE=${DEADLINE:-560}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1
begin=$SECONDS
say() { echo "[$((SECONDS - begin))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((DEADLINE - (SECONDS - begin))); }
enough() { [ "$(left)" -gt "$1" ] || { say "skipped ($1 s needed, $(left) s left): $2"; false; }; }

if [ "$DRY" = 0 ]; then
    DEVICE=cuda ITERS=110 CROP=1024 COUNT=64 SIZE="2048 1024"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .ci/gpu/whl/*.whl 2>&1 | tail -2
    # on sys.path of every process, the test's subprocesses too (after the machine's own)
    echo /tmp/site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/gpu_run.pth"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv,noheader | tee -a "$OUT/summary.txt"
else
    DEVICE=cpu ITERS=30 CROP=128 COUNT=8 SIZE="256 128"
fi
say "$(python3 -c 'import sys, torch, numpy, av, mmseg, mmengine, PIL; print("Python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "NumPy", numpy.__version__, "Pillow", PIL.__version__, "PyAV", av.__version__, "mmseg", mmseg.__version__, "mmengine", mmengine.__version__)' 2>&1 | tail -1)"
say "$(lscpu | grep -m1 'Model name' | sed 's/  */ /g'), $(nproc) cores"
DATA=/tmp/city
python3 .ci/gpu/make_data.py $DATA $COUNT $SIZE | tee -a "$OUT/summary.txt"

tests() {       # tests PYTEST_K LIMIT
    timeout "$2" python3 -m pytest -q -s -rA -p no:cacheprovider -k "$1" test_bisenet.py \
        >> "$OUT/tests.log" 2>&1
    say "tests -k '$1': exit $? ($(tail -1 "$OUT/tests.log"))"
}

data_time() {   # mean data_time and step time of our log windows after the first
    python3 -c "
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if 'data_time' in l][1:]
print(f'data_time {sum(x[\"data_time\"] for x in r) / len(r):.4f} s, step {sum(x[\"step_time\"] for x in r) / len(r):.4f} s')
" "$1" 2>&1 | tail -1
}

ours() {        # ours NAME WORKERS [train.py flags]: --perf, 10 warm-up iterations untimed
    local name=$1 workers=$2
    shift 2
    echo "=== ours $name" >> "$OUT/train.log"
    rm -rf "/tmp/w_$name"
    timeout 150 python3 train.py --device $DEVICE --data-path $DATA --perf --iters $ITERS \
        --batch-size 4 --crop-size $CROP --workers "$workers" --log-interval 10 \
        --work-dir "/tmp/w_$name" "$@" >> "$OUT/train.log" 2>&1
    say "ours  $name (workers $workers $*): exit $? $(grep -a '^FPS' /tmp/w_$name/train.log | tail -1) img/s; $(data_time /tmp/w_$name/metrics.jsonl)"
}

theirs() {      # theirs NAME WORKERS fp32|amp
    echo "=== mmseg $1" >> "$OUT/train.log"
    rm -rf "/tmp/m_$1"
    timeout 180 python3 .ci/gpu/mmseg_train.py $DATA "/tmp/m_$1" $ITERS "$2" "$3" $CROP \
        > "/tmp/m_$1.log" 2>&1
    say "mmseg $1 (workers $2 $3): exit $? $(grep -a 'MMSEG images/s' "/tmp/m_$1.log" | tail -1)"
    cat "/tmp/m_$1.log" >> "$OUT/train.log"
}

bench() {       # bench [eval.py flags]
    echo "=== bench $*" >> "$OUT/bench.log"
    timeout 150 python3 eval.py --benchmark --device $DEVICE "$@" >> "$OUT/bench.log" 2>&1
    say "bench $*: exit $? $(tail -2 "$OUT/bench.log" | head -1)"
    grep -a -E '^(plain model|fast path)' "$OUT/bench.log" | tail -3 >> "$OUT/summary.txt"
}

# 1. the CUDA acceptance tests without torch.compile (training, fp16 overflow, fast path, video)
tests 'cuda and not compile' 240
# 2. training against mmsegmentation: fp32 as the config, the config's 4 workers, alternated
for round in 1 2; do
    enough 60 "training round $round" && ours "fp32_w4_$round" 4
    enough 60 "mmseg round $round" && theirs "fp32_w4_$round" 4 fp32
done
# 3. the decoded cache: filled first, then timed
if enough 70 'cache run'; then
    python3 -c "
import sys; sys.path.insert(0, '.')
import data
d = data.SegmentationDataset('$DATA', 'train', data.TrainTransform(($CROP, $CROP), on_device=True), cache_dir='/tmp/cache')
[d.load(i) for i in range(len(d))]
print(d.cache_note)" >> "$OUT/train.log" 2>&1
    ours cache_w4 4 --cache-dir /tmp/cache
fi
# 4. the compile tests: the plain model, the fast path and torch.compile at batch 1
enough 150 'compile tests' && tests 'cuda and compile' "$(( $(left) < 240 ? $(left) - 20 : 220 ))"
# 5. a larger batch, without compile
for flags in '' '--amp' '--amp --amp-dtype bf16'; do
    [ "$DRY" = 0 ] && enough 40 "bench batch 8 $flags" && bench --batch-size 8 $flags
done
# 6. mixed precision on both sides
enough 60 'ours fp16' && ours fp16_w4 4 --amp
enough 60 'mmseg amp' && theirs amp_w4 4 amp
enough 60 'ours bf16' && ours bf16_w4 4 --amp --amp-dtype bf16
# 7. more workers, where the host has them
enough 60 'ours w8' && ours fp32_w8 8
enough 60 'mmseg w8' && theirs fp32_w8 8 fp32
enough 50 'ours cache w8' && ours cache_w8 8 --cache-dir /tmp/cache
[ "$DRY" = 0 ] && enough 120 'bench batch 8 compiled' && bench --batch-size 8 --compile --amp --amp-dtype bf16
say "done, $(left) s before the deadline"
