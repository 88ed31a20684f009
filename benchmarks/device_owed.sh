#!/usr/bin/env bash
# The H200 runs owed by the CPU-only sessions of 2026-12-04, in groups that each fit one
# device call (10 minutes): bash benchmarks/device_owed.sh GROUP. Every command writes
# under $OUT/GROUP (its JSON and its log); the group ends as one archive $OUT/GROUP.tar.gz
# and a log $OUT/GROUP.log, so that the device's 8-file limit is never reached.
#   tests   the GPU tests of the kernels and engine changed without a device (~5 min)
#   bench   bench_indexer (issue 17), the fused latent write, the engine's settings (~8 min)
#   probes  the decode-overlap, sample-stride and Gluon-filter probes (~7 min)
#   curve   the cost curve, with its profile of the decode step (issue 16, ~5 min)
set -uo pipefail
group=${1:?usage: bash benchmarks/device_owed.sh tests|bench|probes|curve}
root=${OUT:?set OUT to the folder that comes back}
export OUT=$root/$group PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() {   # step SECONDS COMMAND...: run with a time limit, log it, go on after a failure
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$root/$group.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$root/$group.log"
    echo "=== rc ${PIPESTATUS[0]}" | tee -a "$root/$group.log"
}
case $group in
tests)
    step 420 python -m pytest -q -p no:cacheprovider tests/engine tests/test_model.py tests/test_layers.py \
        tests/ops/test_mla_cache.py tests/ops/test_norm_rope.py tests/ops/test_paged_indexer.py \
        --ignore=tests/engine/test_server.py --ignore=tests/engine/test_server_http.py ;;
bench)
    step 200 python benchmarks/bench_indexer.py
    step 60 python -m benchmarks.bench_latent_write
    step 240 python -m benchmarks.bench_engine --batches 1 32 --prompt-len 8192 \
        --settings default no_prefix_cache --shared 7680
    step 100 python -m benchmarks.bench_engine --batches 1 32 --prompt-len 8192 --settings default \
        --vocab 129280 --temperature 0.7 --top-p 0.9 --out "$OUT/sampled" ;;
probes)
    step 150 python -m benchmarks.probe_decode_overlap
    step 150 python -m benchmarks.probe_threshold_sample --decode --variants 16:3:2 32:3:2 64:3:2 64:2:1
    step 120 python -m benchmarks.probe_filter_relu ;;
curve)
    step 420 python -m benchmarks.cost_curve --profile --contexts 8192 131072 16384 32768 65536 --budget-s 360 ;;
*)
    echo "unknown group $group" >&2; exit 2 ;;
esac
tar czf "$root/$group.tar.gz" -C "$root" "$group" && rm -rf "${root:?}/$group"
