#!/usr/bin/env bash
# GRPO, prefer beside TRL 1.16's GRPOTrainer, on this machine, in one run, on the same inputs:
# SmolLM2-135M-Instruct (f32), the first GSM8K questions as chat prompts, the accuracy reward,
# 4 prompts × 8 completions, ≤ 128 new tokens, TRL's defaults (loss dapo, beta 0, no vLLM).
# Makes a Python venv with TRL (a few GiB: torch from PyPI) unless $TRL_PYTHON names one.
# PREFER_FLAGS are added to prefer's side only (e.g. "--gradient-checkpointing --adam-moments-dtype bf16").
#   STEPS=2 THREADS=2 scripts/bench-grpo-vs-trl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-2}
threads=${THREADS:-$(nproc)}
shared=${PREFER_SHARED:-../shared}
data=$shared/data/gsm8k/train.jsonl
[ -f "$data" ] || data=tests/fixtures/gsm8k/train.jsonl
# shellcheck source=scripts/peers/trl-env.sh
. scripts/peers/trl-env.sh
echo "== prefer (threads $threads)"
target/release/prefer --threads "$threads" bench grpo --model "$hf" --data "$data" --steps "$steps" --json ${PREFER_FLAGS:-} | tee target/bench-grpo-prefer.json
echo "== TRL (threads $threads)"
"$py" -W ignore scripts/peers/trl_grpo_bench.py --model "$hf" --data "$data" --steps "$steps" --threads "$threads" | tail -1 | tee target/bench-grpo-trl.json
python3 - <<'PY'
import json
p = json.load(open("target/bench-grpo-prefer.json")); t = json.load(open("target/bench-grpo-trl.json"))
print(f"{'':28}{'prefer':>12}{'TRL':>12}{'ratio':>10}")
print(f"{'s/step':28}{p['s_per_step_mean']:12.1f}{t['s_per_step_mean']:12.1f}{t['s_per_step_mean']/p['s_per_step_mean']:9.2f}x")
print(f"{'peak RSS (GiB)':28}{p['peak_rss_gib']:12.2f}{t['peak_rss_gib']:12.2f}{p['peak_rss_gib']/t['peak_rss_gib']:9.2f}")
PY
