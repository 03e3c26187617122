"""transformers `generate()` on the job `prefer bench generate` times: SmolLM2-135M (HF directory,
f32), the first GSM8K questions as chat prompts, sampling at temperature 1 with no top-k/top-p,
every completion forced to the full length. Prints one JSON line: batch-1 decode tokens/s and
the aggregate tokens/s of prompts × generations. Run by scripts/bench-generate-peers.sh."""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    rows = [json.loads(l) for l in open(a.data)][: a.prompts]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    n = a.max_completion_length

    def gen(batch_texts, g, new):
        enc = tok(batch_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                           min_new_tokens=new, num_return_sequences=g, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t

    gen(texts[:1], 1, 8)  # warm-up
    prefill = gen(texts[:1], 1, 1)
    whole = gen(texts[:1], 1, n)
    batch = gen(texts, a.num_generations, n)
    print(json.dumps({
        "peer": "transformers generate", "torch": torch.__version__, "threads": a.threads,
        "batch1_decode_tokens_per_second": (n - 1) / max(whole - prefill, 1e-9),
        "batch1_end_to_end_tokens_per_second": n / whole,
        "batch_tokens_per_second": len(texts) * a.num_generations * n / batch, "batch_seconds": batch,
    }))


if __name__ == "__main__":
    main()
