# Sourced by the demo scripts (demo*.sh), from the repository root: fetches the model, builds
# prefer, writes the arithmetic set (400 training and 100 held-out questions, seed 0), and sets
#   prefer  the binary
#   model   SmolLM2-135M-Instruct's Q4_1 GGUF
#   data    the arithmetic set's folder (train.jsonl, eval.jsonl, *_prompts.jsonl)
scripts/fetch-model.sh
cargo build --release --quiet
prefer=target/release/prefer
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
data=runs/arithmetic/data
$prefer data make-arithmetic --out $data --train 400 --eval 100 --seed 0
