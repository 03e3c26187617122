"""Writes tests/fixtures/trl-sft/: SFT rows in TRL's four dataset types (plain text,
prompt-completion, conversational prompt-completion, conversational messages) made from the
GSM8K fixture, and what TRL 1.16's SFTTrainer prepares from each with SmolLM2-135M-Instruct's
tokenizer: input_ids and labels (-100 where a token carries no loss), with truncation at
max_length, and the best-fit-decreasing packing of the plain-text rows. prefer's SFT data
path is tested against it token by token (tests/sft.rs).

usage: trl_sft_fixture.py HF_MODEL_DIR OUT_DIR   (needs torch, transformers, trl==1.16.0)
"""

import json
import sys

import trl
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

model_dir, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open("tests/fixtures/gsm8k/train.jsonl")][:6]
all_rows = [json.loads(l) for l in open("tests/fixtures/gsm8k/train.jsonl")]
kinds = {
    "text": [{"text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for r in rows],
    "prompt_completion": [{"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]} for r in rows],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ],
    "messages": [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in rows
    ],
    # short rows of varied length for packing into bins of 256
    "text_short": [{"text": r["question"]} for r in all_rows],
}
expected = {"trl_version": trl.__version__, "max_length": 96, "packed_max_length": 256, "cases": {}}
for name, data in kinds.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        for r in data:
            f.write(json.dumps(r) + "\n")
    for packing in (False, True):
        if packing != (name == "text_short"):
            continue
        max_length = 256 if packing else 96
        args = SFTConfig(output_dir="/tmp/trl-sft-fixture", max_length=max_length, packing=packing, report_to="none", bf16=False)
        trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(data))
        ds = trainer.train_dataset
        case = {"input_ids": [list(x) for x in ds["input_ids"]], "labels": [list(x) for x in ds["labels"]]}
        if packing:
            case["seq_lengths"] = [list(x) for x in ds["seq_lengths"]]
        expected["cases"][name + ("_packed" if packing else "")] = case
with open(f"{out}/expected.json", "w") as f:
    json.dump(expected, f)
print("wrote", out)
