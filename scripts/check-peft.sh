#!/usr/bin/env bash
# Does `peft` load what prefer saves? Trains a LoRA adapter on SmolLM2-135M-Instruct (Q4_1
# GGUF base, all-linear, a few DPO steps on the HH fixture), then scores the same texts with
# `prefer logprobs --model BASE --adapter DIR` and with transformers + `peft.PeftModel.from_pretrained`
# on the HF checkpoint prefer converts from that GGUF, and prints the largest difference.
# Makes a venv with torch, TRL and peft (target/trl-venv) the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/peers/trl-env.sh
"$py" -c "import peft" 2>/dev/null || "$py" -m pip install -q peft
"$py" -c "import peft, transformers, torch; print('peft', peft.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
w=target/peft-check
rm -rf "$w" && mkdir -p "$w"
head -n 16 tests/fixtures/hh-rlhf-harmless-base/pairs.jsonl > "$w/pairs.jsonl"
target/release/prefer train \
  --set model_name_or_path=models/SmolLM2-135M-Instruct.Q4_1.gguf --set train_file="$w/pairs.jsonl" \
  --set output_dir="$w/run" --set use_peft=true --set 'lora_target_modules=["all-linear"]' \
  --set lora_r=8 --set lora_alpha=16 --set learning_rate=1e-3 --set max_steps=4 \
  --set per_device_train_batch_size=2 --set max_length=256 --set max_prompt_length=128 --set disable_tqdm=true --set save_steps=1000
"$py" - "$w" <<'PY'
import json, sys
w = sys.argv[1]
texts = ["The capital of France is Paris.", "2 + 2 = 4, and 3 + 5 = 8.",
         "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nMix flour, water and yeast."]
with open(f"{w}/texts.jsonl", "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
PY
target/release/prefer logprobs --model "$hf" --adapter "$w/run" --data "$w/texts.jsonl" > "$w/prefer.jsonl"
target/release/prefer logprobs --model "$hf" --data "$w/texts.jsonl" > "$w/base.jsonl"
"$py" scripts/peers/peft_logprobs.py "$hf" "$w/run" "$w/texts.jsonl" > "$w/peft.jsonl"
"$py" - "$w" <<'PY'
import json, sys
w = sys.argv[1]
a = [json.loads(l) for l in open(f"{w}/prefer.jsonl")]
b = [json.loads(l) for l in open(f"{w}/peft.jsonl")]
base = [json.loads(l) for l in open(f"{w}/base.jsonl")]
moved = max(abs(p - q) for x, y in zip(a, base) for p, q in zip(x["logprobs"], y["logprobs"]))
print(f"the adapter moves log-probs from the base's by up to {moved:.2e}")
worst = 0.0
for x, y in zip(a, b):
    assert len(x["logprobs"]) == len(y["logprobs"]), (x["line"], len(x["logprobs"]), len(y["logprobs"]))
    d = max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"]))
    worst = max(worst, d)
    print(f"line {x['line']}: {len(x['logprobs'])} tokens, sum prefer {x['sum']:.5f} peft {y['sum']:.5f}, max |diff| {d:.2e}")
print(f"largest per-token difference: {worst:.2e}")
sys.exit(0 if worst < 1e-3 and moved > 100 * worst else 1)
PY
