"""Compare two JSONL files of per-token log-probs ({"line", "logprobs"[, "ids"]}) line by line:
the largest per-token difference, and whether token ids agree where both give them.

usage: compare_logprobs.py A.jsonl B.jsonl [IDS_A.jsonl]   (exit 1 if the ids differ)
"""

import json
import sys

a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
ids = [json.loads(l) for l in open(sys.argv[3])] if len(sys.argv) > 3 else None
worst, ok = 0.0, True
for i, (x, y) in enumerate(zip(a, b)):
    if ids is not None and "ids" in y and ids[i]["ids"] != y["ids"]:
        print(f"line {i + 1}: token ids differ:\n  {ids[i]['ids']}\n  {y['ids']}")
        ok = False
        continue
    n = min(len(x["logprobs"]), len(y["logprobs"]))
    d = max((abs(p - q) for p, q in zip(x["logprobs"][:n], y["logprobs"][:n])), default=0.0)
    worst = max(worst, d)
    print(f"line {i + 1}: {n} tokens, sums {x['sum']:.4f} / {y['sum']:.4f}, max |diff| {d:.2e}")
print(f"largest per-token difference: {worst:.2e}")
sys.exit(0 if ok else 1)
