#!/usr/bin/env bash
# One GPU round in a few device calls (each bounded below the 10-minute call limit), logs under $OUT:
#   bash benchmarks/gpu_round.sh test [K_EXPR]   # install + GPU test suite (or the tests pytest -k K_EXPR selects);
#                                                # WORKERS=0: one process; ISOLATE=1: caches per worker
#   bash benchmarks/gpu_round.sh bench [--quick] # re-tune the matmul (shipped entries skipped; RETUNE=grad_input,...
#                                                # names other kernels) + bench_kernels.py, table in $OUT/kernels.md
#   bash benchmarks/gpu_round.sh models [PARTS]  # whole-model benchmark (bench_models.py --part PARTS)
#   bash benchmarks/gpu_round.sh tune [MODELS]   # tune the common models' shapes (tune_models.py --qat;
#                                                # resumable, stops starting shapes after LIMIT s)
#   bash benchmarks/gpu_round.sh profile         # QAT per-kernel split + static profile on this Triton
#   bash benchmarks/gpu_round.sh sweep [M,N,K ..] # every matmul launch configuration, timed (sweep_matmul.py;
#                                                # REPEAT=3: three rounds over all of them, medians)
# Tuning results persist in .gpu_round_cache while the machine stays warm (a bench cut short resumes
# where it stopped) and are copied to $OUT/cache/autotune/<gpu>.json, to merge into bitcompile/kernels/tuned/.
# Wheels in .whl/ (git-ignored; a machine without internet gets them carried there) are installed
# first: setuptools >= 77 for the editable install, gemlite for the layer stack's peer side. Fill it with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#     -d .whl "setuptools>=77"; pip wheel --no-deps gemlite -w .whl
set -u
out=${OUT:-gpu_round}
mkdir -p "$out" && out=$(cd "$out" && pwd)
export BITCOMPILE_CACHE_DIR="$PWD/.gpu_round_cache"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/bitcompile_wheels .whl/*.whl &&
    export PYTHONPATH=/tmp/bitcompile_wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# (the device tool returns only a few files per call: the install log is kept only when it failed)
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
rm -f "$out/install.log"
case "${1:-}" in
  test)
    # Tests compile far more than they run: 12 workers share the GPU (pytest-xdist, in the device
    # image), with their own tuning cache so contended timings never reach a later bench. The
    # timing test runs alone afterwards. The whole suite takes more than one call (the Inductor
    # QAT test alone autotunes for ~245 s in a fresh cache): a pytest -k expression selects a part.
    select="not host_latency${2:+ and ($2)}"
    workers="-n ${WORKERS:-12}"; [ "${WORKERS:-12}" = 0 ] && workers="-p no:xdist"
    [ -n "${ISOLATE:-}" ] && export BITCOMPILE_TEST_PRIVATE_CACHES=$(mktemp -d)
    BITCOMPILE_CACHE_DIR=$(mktemp -d) timeout 480 python3 -m pytest -q -p no:logging --tb=short --durations=15 \
      $workers -m gpu -k "$select" tests > "$out/test_gpu.log" 2>&1
    echo "test-gpu rc=$?"; tail -40 "$out/test_gpu.log"
    timeout 60 python3 -m pytest -q -p no:logging --tb=short -m gpu -k host_latency tests > "$out/test_timing.log" 2>&1
    echo "test-timing rc=$?"; tail -5 "$out/test_timing.log" ;;
  bench)
    BITCOMPILE_AUTOTUNE=1 BITCOMPILE_RETUNE=${RETUNE:-ternary_mm} timeout 560 python3 benchmarks/bench_kernels.py \
      --out "$out/kernels.md" "${@:2}" > "$out/bench.log" 2>&1
    echo "bench rc=$?"; grep -v "^  \[" "$out/bench.log" | tail -60 ;;
  models)
    (cd benchmarks && timeout "${LIMIT:-560}" python3 bench_models.py --part "${2:-decode,prefill,layers,qat}" \
      --out "$out/models.md" --jsonl "$out/models.jsonl" --profile "$out/models_profile.txt" "${@:3}" \
      > "$out/models.log" 2>&1)
    echo "models rc=$?"; grep -v "^  \[" "$out/models.log" | grep "^{" | tail -60 ;;
  tune)
    (cd benchmarks && timeout 570 python3 tune_models.py --qat --int8-head --limit-s "${LIMIT:-450}" ${2:+--models "$2"} \
      > "$out/tune.log" 2>&1)
    echo "tune rc=$?"; grep -v "^  \[" "$out/tune.log" | tail -20 ;;
  profile)
    timeout 300 python3 benchmarks/profile_qat.py > "$out/profile_qat.log" 2>&1; echo "profile_qat rc=$?"
    timeout 200 python3 tools/inspect_kernels.py --join-k > "$out/inspect.md" 2>&1; echo "inspect rc=$?"
    cat "$out/profile_qat.log"; head -30 "$out/inspect.md" ;;
  sweep)
    cd benchmarks && timeout 560 python3 sweep_matmul.py --json "$out/sweep.json" --repeat "${REPEAT:-1}" ${2:+--shapes "${@:2}"} \
      > "$out/sweep.log" 2>&1; echo "sweep rc=$?"; cd ..; cat "$out/sweep.log" ;;
  *) echo "usage: $0 test [K_EXPR]|bench [--quick]|models [PARTS]|tune [MODELS]|profile|sweep [M,N,K ...]" >&2; exit 2 ;;
esac
cp -r "$BITCOMPILE_CACHE_DIR" "$out/cache" 2>/dev/null || true
