#!/usr/bin/env bash
# The first job: DPO on SmolLM2-135M-Instruct with a preference set whose truth is checkable
# (two-digit additions: the correct sum chosen, a near miss rejected), with a measured
# before/after on 100 held-out questions. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/demo-env.sh
. scripts/demo-env.sh
echo
echo "== before training: SmolLM2-135M-Instruct on 100 held-out questions"
$prefer eval --model $model --data $data/eval.jsonl | tee runs/arithmetic/before.txt
echo
echo "== training (examples/arithmetic-dpo.toml)"
$prefer train --config examples/arithmetic-dpo.toml
echo
echo "== after training: the same 100 held-out questions"
$prefer eval --model runs/arithmetic/dpo --ref $model --data $data/eval.jsonl | tee runs/arithmetic/after.txt
echo
echo "ranking accuracy = how often the model gives the correct sum a higher probability than the near miss."
echo "The trained model is an HF checkpoint in runs/arithmetic/dpo (metrics in runs/arithmetic/dpo/metrics.jsonl)."
