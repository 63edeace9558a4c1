#!/usr/bin/env bash
# The GPU check, in one command from the repository root (a few minutes on one GPU): the CUDA tests, then the quick
# benchmark in float32 and under bf16 autocast, each written to its own file next to RESULTS.md.
#
#   bash benchmarks/gpu.sh
set -u
status=0
python -m pytest -m cuda -q tests || status=1
python -m benchmarks.run --device cuda --quick --output benchmarks/RESULTS-cuda-fp32.md || status=1
python -m benchmarks.run --device cuda --quick --autocast bf16 --output benchmarks/RESULTS-cuda-bf16.md || status=1
exit $status
