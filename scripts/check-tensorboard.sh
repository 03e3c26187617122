#!/usr/bin/env bash
# Does TensorBoard read prefer's event files? Trains a tiny generated model for a few DPO steps
# with report_to = "tensorboard" (stopped and resumed midway), then reads the events with
# TensorBoard's own EventAccumulator and compares every scalar with metrics.jsonl.
# Uses $TRL_PYTHON or target/trl-venv, installing tensorboard there if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example hf_fixtures
cargo build --release --quiet
py=${TRL_PYTHON:-target/trl-venv/bin/python}
[ -x "$py" ] || { python3 -m venv target/trl-venv && py=target/trl-venv/bin/python; }
"$py" -c "import tensorboard" 2>/dev/null || "$py" -m pip install -q tensorboard
w=target/tb-check
rm -rf "$w" && mkdir -p "$w"
target/release/examples/hf_fixtures "$w/fixtures" > /dev/null
python3 -c '
import json
for i in range(32):
    print(json.dumps({"prompt": f"q{i} =", "chosen": " 1", "rejected": " 2"}))' > "$w/pairs.jsonl"
run() { target/release/prefer train --model_name_or_path "$w/fixtures/llama-tied" --train_file "$w/pairs.jsonl" \
  --output_dir "$w/run" --report_to tensorboard --max_steps 8 --logging_steps 1 --save_steps 4 \
  --per_device_train_batch_size 4 --learning_rate 1e-3 --disable_tqdm true "$@" 2>/dev/null; }
run --max_steps 4          # stops after step 4 with a checkpoint ...
run --resume_from_checkpoint latest   # ... and resumes to step 8: a second event file
"$py" scripts/peers/tensorboard_read.py "$w/run/runs" > "$w/tb.json"
python3 - "$w" <<'PY'
import json, sys
w = sys.argv[1]
tb = json.load(open(f"{w}/tb.json"))
logs = [json.loads(l) for l in open(f"{w}/run/metrics.jsonl")]
n = 0
for rec in logs:
    for k, v in rec.items():
        if k == "step" or not isinstance(v, (int, float)):
            continue
        tag = "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
        got = dict((s, x) for s, x in tb[tag])[rec["step"]]
        assert abs(got - v) <= 1e-6 * max(1.0, abs(v)), (tag, rec["step"], got, v)
        n += 1
print(f"TensorBoard read {len(tb)} tags; {n} values equal metrics.jsonl's (as f32), steps {sorted({s for t in tb.values() for s, _ in t})}")
PY
