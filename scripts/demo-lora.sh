#!/usr/bin/env bash
# LoRA DPO next to full fine-tuning on the arithmetic set (two-digit additions: the correct sum
# chosen, a near miss rejected): ranking accuracy on 100 held-out questions before training,
# after full DPO (examples/arithmetic-dpo.toml) and after LoRA DPO
# (examples/arithmetic-dpo-lora.toml), with each run's time and peak memory.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/demo-env.sh
. scripts/demo-env.sh
rm -rf runs/arithmetic/dpo runs/arithmetic/dpo-lora
echo "== before training"
$prefer eval --model $model --data $data/eval.jsonl --json > runs/arithmetic/before.json
for run in dpo dpo-lora; do
  echo "== training: examples/arithmetic-$run.toml"
  /usr/bin/time -f "%e s, peak RSS %M KiB" -o runs/arithmetic/$run.time $prefer train --config examples/arithmetic-$run.toml --set disable_tqdm=true
  $prefer eval --model runs/arithmetic/$run --ref $model --data $data/eval.jsonl --json > runs/arithmetic/$run.json
done
python3 - <<'PY'
import json
def acc(f):
    v = json.load(open(f))
    row = v[-1] if isinstance(v, list) else v
    for k in ("ranking_accuracy", "accuracy"):
        if k in row:
            return row[k]
    return row
print(f"{'':24} {'ranking accuracy':>18} {'train time':>12} {'peak RSS':>10}")
print(f"{'before training':24} {acc('runs/arithmetic/before.json'):>18.2f}")
for run, name in (("dpo", "full DPO"), ("dpo-lora", "LoRA DPO (r 16, all-linear)")):
    secs, kib = open(f"runs/arithmetic/{run}.time").read().split(" s, peak RSS ")
    print(f"{name:24} {acc(f'runs/arithmetic/{run}.json'):>18.2f} {float(secs):>10.0f} s {int(kib.split()[0]) / 1048576:>7.2f} GiB")
PY
