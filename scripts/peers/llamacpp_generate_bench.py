"""llama.cpp (llama-cpp-python) on the job `prefer bench generate` times, with the same GGUF file
(SmolLM2-135M-Instruct Q4_1, llama.cpp's own quantised kernels): one stream, sampling at
temperature 1 with no top-k/top-p/min-p, EOS suppressed so the completion runs to the full
length. Prints one JSON line: the decode tokens/s of the single stream (the prompt's time,
measured by a one-token run, taken off). Run by scripts/bench-generate-peers.sh."""

import argparse
import json
import time

from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the .gguf file")
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-completion-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-repack", action="store_true",
                    help="turn off llama.cpp's CPU weight repacking (AMX/AVX-512), which crashed some builds")
    a = ap.parse_args()
    if a.no_repack:
        from llamacpp_no_repack import no_repack

        no_repack()
    llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_batch=512, verbose=False)
    q = json.loads(open(a.data).readline())["question"]
    prompt = llm.tokenize(("<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n").encode(), special=True)
    n = a.max_completion_length

    def run(new):
        llm.reset()
        t = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=new, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                    seed=7, logit_bias={llm.token_eos(): -1e9})
        return time.perf_counter() - t, out["usage"]["completion_tokens"]

    run(8)  # warm-up
    prefill, _ = run(1)
    whole, made = run(n)
    print(json.dumps({
        "peer": "llama.cpp (llama-cpp-python)", "threads": a.threads, "completion_tokens": made,
        "repack": not a.no_repack,
        "batch1_decode_tokens_per_second": (made - 1) / max(whole - prefill, 1e-9),
        "batch1_end_to_end_tokens_per_second": made / whole,
    }))


if __name__ == "__main__":
    main()
