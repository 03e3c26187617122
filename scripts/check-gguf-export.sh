#!/usr/bin/env bash
# Does llama.cpp run what `prefer export` writes? Exports SmolLM2-135M-Instruct (from the Q4_1
# GGUF, dequantised) at f32, f16, q8_0 and q4_k_m, and prefer's tiny test checkpoints (Llama
# tied, Llama with BOS, Qwen2 with q/k/v bias; `examples/hf_fixtures`) at f32, and SmolLM2 with
# Llama-3 RoPE scaling put in its config (written as llama.cpp's rope_freqs tensor), then compares,
# text by text, llama.cpp's token ids with prefer's and llama.cpp's per-token log-probs with
# prefer's on the same file. Makes a venv with llama-cpp-python (which builds llama.cpp,
# several minutes) in target/peer-venv the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo build --release --quiet
cargo build --release --quiet --example hf_fixtures
py=${PEER_PYTHON:-}
if [ -z "$py" ]; then
  venv=${PEER_VENV:-target/peer-venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null || "$venv/bin/pip" install -q llama-cpp-python numpy
  py=$venv/bin/python
fi
"$py" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
lscpu | grep -E "Model name" || true
prefer=target/release/prefer
w=target/gguf-check
rm -rf "$w" && mkdir -p "$w"
cat > "$w/texts.jsonl" <<'TXT'
{"text": "The capital of France is Paris."}
{"text": "2 + 2 = 4, and 13 + 58 = 71."}
{"text": "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\nMix flour, water and yeast."}
TXT
check() { # name, gguf
  $prefer tokenize --model "$2" --data "$w/texts.jsonl" > "$w/$1-ids.jsonl"
  $prefer logprobs --model "$2" --data "$w/texts.jsonl" > "$w/$1-prefer.jsonl"
  "$py" scripts/peers/llamacpp_logprobs.py "$2" "$w/texts.jsonl" > "$w/$1-llamacpp.jsonl" 2> "$w/$1.err"
  echo "== $1 ($(du -h "$2" | cut -f1))"
  python3 scripts/peers/compare_logprobs.py "$w/$1-prefer.jsonl" "$w/$1-llamacpp.jsonl" "$w/$1-ids.jsonl"
}
for q in f32 f16 q8_0 q4_k_m; do
  $prefer export --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$w/smollm2-$q.gguf" --quant $q
  check "smollm2-$q" "$w/smollm2-$q.gguf"
done
target/release/examples/hf_fixtures "$w/fixtures" > /dev/null
for m in llama-tied llama-bos qwen2-untied-bias; do
  $prefer export --model "$w/fixtures/$m" --out "$w/$m.gguf" --quant f32
  check "$m" "$w/$m.gguf"
done
# Llama-3 RoPE scaling: SmolLM2's HF checkpoint with rope_scaling added (its low frequencies
# then change at every position); prefer on the HF directory against llama.cpp on the export
$prefer convert --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$w/smollm2-llama3-rope" > /dev/null
python3 - "$w/smollm2-llama3-rope/config.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
json.dump(c, open(p, "w"), indent=2)
PY
$prefer export --model "$w/smollm2-llama3-rope" --out "$w/smollm2-llama3-rope.gguf" --quant f32
$prefer logprobs --model "$w/smollm2-llama3-rope" --data "$w/texts.jsonl" > "$w/llama3-rope-hf.jsonl"
check smollm2-llama3-rope "$w/smollm2-llama3-rope.gguf"
echo "== prefer, the HF directory against the GGUF it exported"
python3 scripts/peers/compare_logprobs.py "$w/llama3-rope-hf.jsonl" "$w/smollm2-llama3-rope-prefer.jsonl"
echo "== for scale: the scaled model against SmolLM2 without scaling (llama.cpp, f32)"
python3 scripts/peers/compare_logprobs.py "$w/smollm2-llama3-rope-llamacpp.jsonl" "$w/smollm2-f32-llamacpp.jsonl" || true
