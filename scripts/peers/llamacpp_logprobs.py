"""Per-token log-probs of texts under a GGUF file run by llama.cpp (llama-cpp-python), as JSON
lines {"line", "ids", "logprobs", "sum"} (the ids llama.cpp's own tokenizer gives, no BOS
unless the file asks for it), to compare with `prefer tokenize` and `prefer logprobs`.

usage: llamacpp_logprobs.py MODEL.gguf TEXTS.jsonl [FIELD]
"""

import json
import sys

import llama_cpp.llama_cpp as lib
import numpy as np
from llama_cpp import Llama

# Without llama.cpp's "extra buffer types" (the CPU repacking of Q4_0/Q4_1/Q8_0/K-quant weights
# for AMX and AVX-512): llama-cpp-python 0.3.36 crashed on this machine (Xeon with AMX) in that
# path on every quantised file, SmolLM2's own Q4_1 GGUF included; the plain CPU path runs.
_defaults = lib.llama_model_default_params


def _no_repack():
    p = _defaults()
    p.use_extra_bufts = False
    return p


lib.llama_model_default_params = _no_repack

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
