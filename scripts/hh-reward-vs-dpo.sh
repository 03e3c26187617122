#!/usr/bin/env bash
# Real-data comparison of explicit and implicit rewards: on the Anthropic HH harmless pairs,
# train a Bradley-Terry reward model and a DPO policy from SmolLM2-135M-Instruct on the same
# split, then report both accuracies on the same held-out pairs.
#   scripts/hh-reward-vs-dpo.sh [HH_PAIRS_JSONL]   (TRAIN=160 HELD=100 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
hh=${1:-../shared/data/hh-rlhf-harmless-base/pairs.jsonl}
train=${TRAIN:-160}
held=${HELD:-100}
scripts/fetch-model.sh
cargo build --release --quiet
prefer=target/release/prefer
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
out=runs/hh-rm-vs-dpo
mkdir -p $out
head -n "$train" "$hh" > $out/train.jsonl
sed -n "$((train + 1)),$((train + held))p" "$hh" > $out/heldout.jsonl
common=(--set "model_name_or_path=$model" --set "train_file=$out/train.jsonl" --set max_length=192
        --set max_prompt_length=128 --set skip_invalid=true --set per_device_train_batch_size=4
        --set num_train_epochs=1 --set logging_steps=5 --set save_steps=100000)
$prefer train "${common[@]}" --set task=reward --set learning_rate=2e-5 --set "output_dir=$out/rm"
$prefer train "${common[@]}" --set learning_rate=5e-6 --set beta=0.1 --set precompute_ref_log_probs=true \
    --set "ref_log_probs_cache_dir=$out/ref_cache" --set "output_dir=$out/dpo"
evalopts=(--data $out/heldout.jsonl --skip-invalid --max-length 192 --max-prompt-length 128)
echo "== reward model on held-out pairs"
$prefer eval --model $out/rm "${evalopts[@]}" | tee $out/rm_eval.txt
echo "== DPO implicit reward on the same held-out pairs"
$prefer eval --model $out/dpo --ref $model "${evalopts[@]}" | tee $out/dpo_eval.txt
