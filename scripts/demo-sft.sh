#!/usr/bin/env bash
# SFT on the arithmetic set: SmolLM2-135M-Instruct fine-tuned on 400 correct answers
# (conversational prompt-completion rows), greedy answer accuracy on 100 held-out questions
# before and after (`prefer eval --prompts ... --reward accuracy`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/demo-env.sh
. scripts/demo-env.sh
mkdir -p runs/arithmetic/sft
# the pairs' chosen answers as prompt-completion rows
python3 -c '
import json, sys
with open("runs/arithmetic/sft/train.jsonl", "w") as out:
    for line in open("runs/arithmetic/data/train.jsonl"):
        r = json.loads(line)
        out.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n")
'
rm -rf runs/arithmetic/sft/run
echo "== before: greedy answers to 100 held-out questions"
$prefer eval --model $model --prompts $data/eval_prompts.jsonl --reward accuracy --max-completion-length 8 --json > runs/arithmetic/sft/before.json
echo "== SFT (examples/arithmetic-sft.toml)"
$prefer train --config examples/arithmetic-sft.toml --set disable_tqdm=true
echo "== after"
$prefer eval --model runs/arithmetic/sft/run --prompts $data/eval_prompts.jsonl --reward accuracy --max-completion-length 8 --json > runs/arithmetic/sft/after.json
python3 -c '
import json
b, a = (json.load(open(f"runs/arithmetic/sft/{x}.json")) for x in ("before", "after"))
print(f"greedy answer accuracy on 100 held-out questions: before {b['reward']:.2f}, after SFT {a['reward']:.2f}")
'
