#!/usr/bin/env bash
# DPO, prefer beside TRL 1.16's DPOTrainer, on this machine, in one run, on the same inputs:
# SmolLM2-135M-Instruct (the GGUF converted by prefer to an HF checkpoint whose tokenizer.json is
# the tokenizer prefer uses), the first HH pairs that fit max_length whole (so neither side
# truncates), in file order, batch 2, beta 0.1, lr 1e-6. For each configuration prefer runs, then
# TRL on the rows prefer trained on; one table at the end, on the batches both processed.
# Makes a Python venv with TRL (a few GiB: torch from PyPI) unless $TRL_PYTHON names one.
# PREFER_FLAGS are added to prefer's side only (e.g. "--adam-moments-dtype bf16").
#   STEPS=5 THREADS=2 CONFIGS="live precomputed checkpointing bf16" scripts/bench-dpo-vs-trl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-5}
threads=${THREADS:-$(nproc)}
configs=${CONFIGS:-live precomputed checkpointing bf16}
shared=${PREFER_SHARED:-../shared}
data=$shared/data/hh-rlhf-harmless-base/pairs.jsonl
[ -f "$data" ] || data=tests/fixtures/hh-rlhf-harmless-base/pairs.jsonl
# shellcheck source=scripts/peers/trl-env.sh
. scripts/peers/trl-env.sh
out=target/bench-dpo
mkdir -p "$out"
grep -o -w -E 'avx512f|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
for c in $configs; do
  case $c in
    live) p_flags=""; t_flags="" ;;
    precomputed) p_flags="--precompute-ref-log-probs"; t_flags="--precompute-ref-log-probs" ;;
    checkpointing) p_flags="--gradient-checkpointing"; t_flags="--gradient-checkpointing" ;;
    bf16) p_flags="--bf16"; t_flags="--bf16" ;;
    *) echo "unknown configuration $c (live, precomputed, checkpointing, bf16)"; exit 2 ;;
  esac
  echo "== $c: prefer (threads $threads)"
  # shellcheck disable=SC2086
  target/release/prefer --threads "$threads" bench dpo --model "$hf" --data "$data" --steps "$steps" \
    --rows-out "$out/rows.jsonl" --json $p_flags ${PREFER_FLAGS:-} | tail -1 > "$out/$c-prefer.json"
  echo "== $c: TRL (threads $threads)"
  # shellcheck disable=SC2086
  "$py" -W ignore scripts/peers/trl_dpo_bench.py --model "$hf" --data "$out/rows.jsonl" --steps "$steps" \
    --threads "$threads" $t_flags | tail -1 > "$out/$c-trl.json"
done
CONFIGS="$configs" OUT="$out" python3 - <<'PY'
import json, os, statistics
out = os.environ["OUT"]
# s/step: the mean over the timed steps (the same batches on both sides, so the ratio of means
# is the ratio of total times) and the median; tokens/s from prefer's count of the same rows
print(f"{'configuration':15}{'prefer s/step':>15}{'TRL s/step':>13}{'speed-up':>10}{'prefer tok/s':>14}{'TRL tok/s':>11}{'prefer GiB':>12}{'TRL GiB':>9}{'memory':>8}{'max |Δloss|':>13}")
print(f"{'':15}{'mean (median)':>15}{'mean (median)':>13}{'mean (med)':>10}")
for c in os.environ["CONFIGS"].split():
    p = json.load(open(f"{out}/{c}-prefer.json")); t = json.load(open(f"{out}/{c}-trl.json"))
    pm, tm = statistics.mean(p["s_per_step"]), statistics.mean(t["s_per_step"])
    pd, td = p["s_per_step_median"], t["s_per_step_median"]
    tok = p["tokens_per_step"]  # the same rows, so the same tokens per step
    # the same rows, model and settings: the losses of every step agree (bf16 rounds differently)
    dl = max(abs(a - b) for a, b in zip(p["losses"], t["losses"]))
    print(f"{c:15}{pm:7.2f} ({pd:5.2f}){tm:6.2f} ({td:5.2f}){tm/pm:5.2f} ({td/pd:.2f}){tok/pm:11.0f}{tok/tm:11.0f}{p['peak_rss_gib']:12.2f}{t['peak_rss_gib']:9.2f}{p['peak_rss_gib']/t['peak_rss_gib']:8.2f}{dl:13.1e}")
first = json.load(open(f"{out}/{os.environ['CONFIGS'].split()[0]}-prefer.json"))
print(f"prefer's kernel path: {first.get('kernel_path')}, Adam moments {first.get('adam_moments_dtype')}, optimizer_in_backward {first.get('optimizer_in_backward', False)}; {first['tokens_per_step']:.0f} tokens per step on both sides (the same rows)")
PY
