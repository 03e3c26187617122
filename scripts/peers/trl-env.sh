# Sourced by the scripts that run TRL beside prefer (bench-*-vs-trl.sh), from the repository
# root: builds prefer, fetches the model, and sets
#   py  a Python with torch 2.15 and TRL 1.16 ($TRL_PYTHON, or a venv it makes in
#       $TRL_VENV, default target/trl-venv; a few GiB: torch from PyPI)
#   hf  SmolLM2-135M-Instruct as an HF checkpoint converted by prefer from the GGUF (its
#       tokenizer.json is the tokenizer prefer uses, so both sides see the same ids)
# and prints the CPU.
scripts/fetch-model.sh
cargo build --release --quiet
py=${TRL_PYTHON:-}
if [ -z "$py" ]; then
  venv=${TRL_VENV:-target/trl-venv}
  [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.15.0 trl==1.16.0; }
  py=$venv/bin/python
fi
hf=target/smollm2-135m-hf
[ -f "$hf/model.safetensors" ] || target/release/prefer convert --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out "$hf"
lscpu | grep -E "Model name|^CPU\(s\)" || true
