#!/usr/bin/env bash
# The checks CI cannot run, on a machine with a CUDA GPU (README, "On a GPU"): tests/gpu (the engine,
# the bootstrap's SFT, DPO with LoRA and QLoRA nf4 through TRL, the merge) and the generation
# benchmark on the GPU. Run from the repository root with the project's packages importable.
# usage: scripts/gpu_check.sh [MODEL]   MODEL: what benchmarks/generation.py --model takes (default smollm2)
# Logs go to $GPU_CHECK_LOGS (default var/gpu-check). Exit status: the tests', else the benchmark's.
set -uo pipefail
logs=${GPU_CHECK_LOGS:-var/gpu-check}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$logs/versions.txt" || exit 1
import importlib.metadata as md, torch
assert torch.cuda.is_available(), "no CUDA device: these checks need one"
print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
      ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "trl", "peft", "bitsandbytes", "datasets")))
PY
python3 -m pytest tests/gpu -p no:cacheprovider -ra 2>&1 | tee "$logs/tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/generation.py --model "${1:-smollm2}" 2>&1 | tee "$logs/generation.log"
bench=${PIPESTATUS[0]}
[ "$tests" -ne 0 ] && exit "$tests"
exit "$bench"
