"""Per-token log-probs of texts under an HF base model with a PEFT LoRA adapter loaded by
`peft.PeftModel.from_pretrained`, as JSON lines shaped like `prefer logprobs`' output
({"line", "logprobs", "sum"}), so the two can be compared token by token.

usage: peft_logprobs.py BASE_DIR ADAPTER_DIR TEXTS.jsonl [FIELD]
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_dir, adapter_dir, texts = sys.argv[1], sys.argv[2], sys.argv[3]
field = sys.argv[4] if len(sys.argv) > 4 else "text"
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(base_dir)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir)
model.eval()
with open(texts) as f, torch.no_grad():
    for line, row in enumerate(f, 1):
        ids = tok(json.loads(row)[field], return_tensors="pt").input_ids
        logits = model(input_ids=ids).logits[0, :-1].double()
        lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        print(json.dumps({"line": line, "logprobs": lp.tolist(), "sum": lp.sum().item()}))
