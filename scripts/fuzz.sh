#!/usr/bin/env bash
# Fuzz every parser a user feeds (JSONL pairs and prompts, the TOML config and --set, GGUF,
# safetensors, config.json, tokenizer.json, chat templates) with seeded mutations of valid
# inputs, on the stable toolchain: a million inputs per target by default, targets in parallel
# over the cores. Fails on a panic, an input slower than 2 s, or an allocation far beyond the
# input's size; failing inputs go to target/fuzz-failures/.
#   ITERATIONS=1000000 SEED=1 scripts/fuzz.sh [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${ITERATIONS:-1000000}
seed=${SEED:-1}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(jsonl_pairs jsonl_prompts config_toml gguf safetensors config_json tokenizer_json chat_template)
cargo build --release --quiet --features testing --example fuzz
mkdir -p target/fuzz
printf '%s\n' "${targets[@]}" | RAYON_NUM_THREADS=1 xargs -P "$(nproc)" -I{} \
  sh -c "target/release/examples/fuzz --target {} --iterations $iterations --seed $seed > target/fuzz/{}.json"
cat target/fuzz/*.json
! grep -q '"panics":[1-9]\|"slow_inputs":[1-9]' target/fuzz/*.json
