"""Per-token log-probs of texts under a GGUF file run by llama.cpp (llama-cpp-python), as JSON
lines {"line", "ids", "logprobs", "sum"} (the ids llama.cpp's own tokenizer gives, no BOS
unless the file asks for it), to compare with `prefer tokenize` and `prefer logprobs`.

usage: llamacpp_logprobs.py MODEL.gguf TEXTS.jsonl [FIELD]
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

from llamacpp_no_repack import no_repack

# the repacking path crashed here on every quantised file (see llamacpp_no_repack)
no_repack()

path, texts = sys.argv[1], sys.argv[2]
field = sys.argv[3] if len(sys.argv) > 3 else "text"
llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
with open(texts) as f:
    for line, row in enumerate(f, 1):
        text = json.loads(row)[field]
        ids = llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true", special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        lp = [float(logits[i, ids[i + 1]] - lse[i]) for i in range(len(ids) - 1)]
        print(json.dumps({"line": line, "ids": ids, "logprobs": lp, "sum": sum(lp)}))
