#!/usr/bin/env bash
# The checks and benchmarks that need a node's GPUs, in one go: perf/node_suite.sh [STEP ...]
#
#   dist      python -m pytest tests/dist (NVSHMEM world, every visible GPU)
#   dispatch  perf.bench_dispatch_gemm (dispatch alone, GEMM alone, fused, baseline, switches,
#             fewer dispatch programs, the copy's loads pipelined 4 steps ahead, GEMM1's gate
#             and up as two products instead of one, and the dispatch-only op with its default
#             4 programs per SM, and 1 and 2)
#   sweep     perf.sweep_dispatch (programs per GPU x units per dispatch task x columns per
#             copy step x steps loaded ahead, over NVLink)
#   layer     perf.bench_layer (the whole layer against the unfused baseline; also with the
#             top-k reduce as one band per column group, with fewer programs putting the
#             dispatch while the others start GEMM1, and GEMM1 as two products; each variant timed
#             in alternation with the default, whose figure goes beside it)
#   profile   megakernel.profile --overhead, dsv3 then qwen3_235b (trace, timeline, summary)
#   profile32 megakernel.profile, qwen3_235b with 32 dispatch programs
#   scaling   perf.scaling (this GPU count's point of the scaling plot)
#   fp8       one GPU: perf.bench_layer --emulate 1 --fp8, dsv3 and qwen3_235b (the FP8 layer
#             against bf16 in one alternation; also with the dispatch quantising one scale group
#             a step, block_h=128, and with remainder tiles at full height, half_tiles=False),
#             then tests/gpu/test_fp8_layer_cuda.py
#   fp8trace  one GPU: megakernel.profile --fp8 --emulate 1, dsv3 (the FP8 layer's task trace)
#   peers     one GPU: perf.bench_peers --fp8, dsv3 and qwen3_235b at T = 4096 and 128 (our
#             layer eager and graphed, bf16 and FP8, Liger-Kernel where installed, torch, the
#             weight-read bound)
#   tails     one GPU: tests/gpu/test_layer_cuda.py -k tail_rows, then perf.bench_layer
#             --emulate 1 at T = 4096 and 1024 over dsv3, qwen3_235b, gpt_oss and mixtral, with an
#             expert's tail rows in the tile before (tail_rows=32), also without the paired GEMM1
#             product, each in one alternation with the default
#
# No STEP: dist to scaling, in that order (the one-GPU steps run when named). Each step's output
# goes to $OUT/<step>.log (OUT defaults to perf/results/node_suite), its last lines to the
# terminal; a failed step does not stop the ones after it, and the exit status is the number of
# failed steps. Python scripts relaunch themselves under torchrun with the NVSHMEM environment
# (symm_mem.launch).
#
# With OUT set, the perf/results files a step writes are copied into $OUT too: on the device
# machine only $OUT comes back, at most 8 files of it. A step leaves at most 7 there (profile:
# its log and 3 files per preset), so give that machine one step per command, or steps whose
# files add up to 8 (dispatch + layer: 4; dist: 1).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the torchrun workers import the packages too
out=${OUT:-perf/results/node_suite}
mkdir -p "$out"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(dist dispatch sweep layer profile profile32 scaling)

run_step() {
  case $1 in
    dist) python3 -m pytest tests/dist -q -s ;;
    dispatch)
      python3 -m perf.bench_dispatch_gemm \
        --vary dispatch_ctas=16,32,64,96 copy_stages=4 gemm1_pairs=0 \
        --dispatch-programs 0 132 264
      ;;
    sweep) python3 -m perf.sweep_dispatch --ctas 132 264 528 ;;
    layer)
      python3 -m perf.bench_layer --vary reduce_lag=1000000 dispatch_ctas=16,32,64 gemm1_pairs=0
      ;;
    profile)
      python3 -m megakernel.profile --preset dsv3 --overhead --out "$out" &&
        python3 -m megakernel.profile --preset qwen3_235b --out "$out"
      ;;
    profile32)
      python3 -m megakernel.profile --preset qwen3_235b --set dispatch_ctas=32 --out "$out"
      ;;
    scaling) python3 -m perf.scaling ;;
    fp8)
      python3 -m perf.bench_layer --emulate 1 --presets dsv3 qwen3_235b --fp8 \
        --fp8-vary block_h=128 half_tiles=False &&
        python3 -m pytest tests/gpu/test_fp8_layer_cuda.py -q
      ;;
    fp8trace)
      python3 -m megakernel.profile --preset dsv3 --tokens 4096 --emulate 1 --fp8 --out "$out"
      ;;
    peers) python3 -m perf.bench_peers --presets dsv3 qwen3_235b --tokens 4096 128 --fp8 ;;
    tails)
      python3 -m pytest tests/gpu/test_layer_cuda.py -q -k tail_rows &&
        for t in 4096 1024; do
          python3 -m perf.bench_layer --emulate 1 --presets dsv3 qwen3_235b gpt_oss mixtral \
            --tokens "$t" --vary tail_rows=32 tail_rows=32+gemm1_pairs=False || return
        done
      ;;
    *)
      echo "unknown step $1 (dist, dispatch, sweep, layer, profile, profile32, scaling, fp8," \
        "fp8trace, peers, tails)" >&2
      return 2
      ;;
  esac
}

failed=0
summary=()
for step in "${steps[@]}"; do
  start=$SECONDS
  stamp=$(mktemp)
  run_step "$step" > "$out/$step.log" 2>&1
  rc=$?
  if [ -n "${OUT:-}" ]; then
    find perf/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$out/" \;
  fi
  rm -f "$stamp"
  summary+=("$(printf '%-9s rc %-3s %5ss' "$step" "$rc" "$((SECONDS - start))")")
  echo "== $step (rc $rc), last lines of $out/$step.log:"
  tail -n "${TAIL:-15}" "$out/$step.log"
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
