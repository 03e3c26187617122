"""Writes tests/fixtures/datasets/ with Hugging Face `datasets`: the first 8 HH pairs and the
first 6 conversational SFT rows of the other fixtures as a Parquet file, a JSON array, and a
DatasetDict saved to disk (train: the first 6 pairs, test: the other 2), and the same two
splits as a hub download leaves them (`data/train-00000-of-00001.parquet`, `data/test-...`),
so tests read files exactly as `datasets` writes them.

usage: datasets_fixture.py   (from the repository root; needs `datasets`)
"""

import json
import os

import datasets
from datasets import Dataset, DatasetDict

out = "tests/fixtures/datasets"
pairs = [json.loads(l) for l in open("tests/fixtures/hh-rlhf-harmless-base/pairs.jsonl")][:8]
sft = [json.loads(l) for l in open("tests/fixtures/trl-sft/messages.jsonl")]
ds = Dataset.from_list(pairs)
ds.to_parquet(f"{out}/pairs.parquet")
ds.to_json(f"{out}/pairs-array.json", lines=False)
DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 8))}).save_to_disk(f"{out}/pairs-dict")
os.makedirs(f"{out}/pairs-hub/data", exist_ok=True)
ds.select(range(6)).to_parquet(f"{out}/pairs-hub/data/train-00000-of-00001.parquet")
ds.select(range(6, 8)).to_parquet(f"{out}/pairs-hub/data/test-00000-of-00001.parquet")
Dataset.from_list(sft).to_parquet(f"{out}/messages.parquet")
with open(f"{out}/pairs.jsonl", "w") as f:
    for r in pairs:
        f.write(json.dumps(r) + "\n")
print("datasets", datasets.__version__, "wrote", out)
