#!/usr/bin/env bash
# Generation speed, prefer beside transformers generate() and llama.cpp, on this machine, in
# one run, on the same prompts: SmolLM2-135M-Instruct, the first GSM8K questions as chat prompts,
# temperature 1, 128 new tokens per completion; batch 1 and 4 prompts × 8 generations.
# Makes a Python venv with transformers and llama-cpp-python (which builds llama.cpp) unless
# $PEER_PYTHON names one ($TRANSFORMERS_PYTHON / $LLAMACPP_PYTHON, when set, run that peer
# instead, e.g. the TRL venv's python for transformers; LLAMACPP_NO_REPACK=1 turns off llama.cpp's
# weight repacking, whose AMX path crashed a llama-cpp-python build here).
#   THREADS=2 scripts/bench-generate-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
shared=${PREFER_SHARED:-../shared}
data=$shared/data/gsm8k/train.jsonl
[ -f "$data" ] || data=tests/fixtures/gsm8k/train.jsonl
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-model.sh
cargo build --release --quiet
py=${PEER_PYTHON:-}
if [ -z "$py" ]; then
  venv=${PEER_VENV:-target/peer-venv}
  [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.15.0 transformers llama-cpp-python; }
  py=$venv/bin/python
fi
hf=target/smollm2-135m-hf
[ -f "$hf/model.safetensors" ] || target/release/prefer convert --model $gguf --out "$hf"
lscpu | grep -E "Model name|^CPU\(s\)" || true
echo "== prefer (threads $threads, f32 weights from the GGUF)"
target/release/prefer --threads "$threads" bench generate --model $gguf --data "$data" --json | tee target/bench-generate-prefer.json
echo "== prefer, decoding from bf16 copies of the weights (--bf16-weights)"
target/release/prefer --threads "$threads" bench generate --model $gguf --data "$data" --json --bf16-weights | tee target/bench-generate-prefer-bf16.json
echo "== transformers generate (f32)"
"${TRANSFORMERS_PYTHON:-$py}" -W ignore scripts/peers/transformers_generate_bench.py --model "$hf" --data "$data" --threads "$threads" | tail -1 | tee target/bench-generate-transformers.json
echo "== llama.cpp (Q4_1 GGUF)"
"${LLAMACPP_PYTHON:-$py}" -W ignore scripts/peers/llamacpp_generate_bench.py --model $gguf --data "$data" --threads "$threads" ${LLAMACPP_NO_REPACK:+--no-repack} | tail -1 | tee target/bench-generate-llamacpp.json
python3 - <<'PY'
import json
p = json.load(open("target/bench-generate-prefer.json"))
b = json.load(open("target/bench-generate-prefer-bf16.json"))
t = json.load(open("target/bench-generate-transformers.json"))
l = json.load(open("target/bench-generate-llamacpp.json"))
print(f"{'tokens/s':34}{'prefer':>10}{'prefer bf16':>13}{'transformers':>14}{'llama.cpp':>11}")
print(f"{'batch 1, decode':34}{p['batch1_decode_tokens_per_second']:10.1f}{b['batch1_decode_tokens_per_second']:13.1f}"
      f"{t['batch1_decode_tokens_per_second']:14.1f}{l['batch1_decode_tokens_per_second']:11.1f}")
print(f"{'4 prompts x 8 generations':34}{p['batch_tokens_per_second']:10.1f}{b['batch_tokens_per_second']:13.1f}"
      f"{t['batch_tokens_per_second']:14.1f}{'':>11}")
print(f"prefer bf16 decodes from: {b['decode_weights']}")
for name, r in (("prefer", p), ("prefer bf16", b)):
    print(f"{name}: batch vs llama.cpp's one stream {r['batch_tokens_per_second']/l['batch1_decode_tokens_per_second']:.2f}x; "
          f"vs transformers' batch {r['batch_tokens_per_second']/t['batch_tokens_per_second']:.2f}x; "
          f"batch-1 decode vs llama.cpp {r['batch1_decode_tokens_per_second']/l['batch1_decode_tokens_per_second']:.2f}x")
PY
