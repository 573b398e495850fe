#!/usr/bin/env bash
# One device call on the H200 (benchmarks/NOTES.md, "The H200 in one call"):
#   (a) the kernel tests on CUDA, compiled (no Triton interpreter): pytest tests/hope_kernels
#   (b) benchmarks/gpu_suite.py with the time that is left, writing h200_<date>.json / .md into $OUT
# fla-core (FLA's kernels, pure Python) travels as a wheel in the git-ignored .whl/ (carry: [".whl"]);
# without it the suite records FLA as "not installed". Everything lands in $OUT (at most 8 files come back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
START=$(date +%s)
TOTAL_S=${HOPE_H200_TOTAL_S:-560}  # the call's 600 s limit, less a margin for start-up and the file transfer
TESTS_S=${HOPE_H200_TESTS_S:-170}  # cap on the kernel tests; the suite gets the rest
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

PYPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  # --no-deps: fla-core needs einops, torch and triton, which the image has; nothing can be fetched there.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && PYPATH=/tmp/site:$PWD || echo "run_h200: installing .whl/*.whl failed; FLA will be recorded as not installed"
else
  echo "run_h200: no .whl/*.whl carried; FLA will be recorded as not installed"
fi
export PYTHONPATH=$PYPATH

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

echo "== (a) kernel tests on CUDA (cap ${TESTS_S} s)"
timeout -k 10 "$TESTS_S" python3 -m pytest tests/hope_kernels -q -n 8 -p no:cacheprovider \
  --junitxml="$OUT/kernel_tests.xml" >"$OUT/kernel_tests.log" 2>&1
echo "kernel tests: exit $? (124 = hit the cap); last lines:"
tail -n 15 "$OUT/kernel_tests.log"

LEFT=$((TOTAL_S - ($(date +%s) - START)))
BUDGET=$((LEFT - 70))  # a case started just before the budget ends still runs to completion
echo "== (b) gpu_suite.py: ${LEFT} s left, --budget-s ${BUDGET}"
timeout -k 10 "$LEFT" python3 benchmarks/gpu_suite.py --out-dir "$OUT" --budget-s "$BUDGET" >"$OUT/gpu_suite.log" 2>&1
echo "gpu_suite: exit $? (124 = killed at the limit; the JSON and markdown hold every case finished before)"
grep -E "^(ceilings|goals|wrote)" "$OUT/gpu_suite.log"
cat "$OUT"/*.md 2>/dev/null | head -c 9000
