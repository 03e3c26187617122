"""TRL 1.16's GRPOTrainer on the same job as `prefer bench grpo`: SmolLM2-135M (an HF
directory; `prefer convert` makes one from the GGUF), the first GSM8K questions as chat prompts,
the accuracy reward, f32 on CPU, no vLLM, TRL's defaults (loss dapo, beta 0). Times each
optimizer step after a warm-up one and prints one JSON line: s/step, peak RSS, generated
tokens/s. Run by scripts/bench-grpo-vs-trl.sh, which runs prefer on the same inputs beside it.
"""

import argparse
import json
import re
import resource
import statistics

import torch
from datasets import Dataset
from timing import Timer
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def final_number(text):
    """The answer as prefer's `accuracy` reads it: after ####, in \\boxed{}, else the last number."""
    m = re.search(r"####\s*([-0-9.,]+)", text) or re.search(r"\\boxed\{([^}]*)\}", text)
    nums = [m.group(1)] if m else re.findall(r"-?[0-9][0-9,]*\.?[0-9]*", text)
    if not nums:
        return None
    s = nums[-1].replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def accuracy(completions, answer, **_):
    out = []
    for c, a in zip(completions, answer):
        text = c[0]["content"] if isinstance(c, list) else c
        g, p = final_number(a), final_number(text)
        out.append(1.0 if g is not None and p is not None and g == p else 0.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="GSM8K JSONL (question, answer)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = (a.steps + 1) * a.prompts
    rows = [json.loads(l) for l in open(a.data)][:n]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    cfg = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench", per_device_train_batch_size=a.prompts * a.num_generations,
        num_generations=a.num_generations, max_completion_length=a.max_completion_length,
        max_steps=a.steps + 1, learning_rate=1e-6, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, shuffle_dataset=False, gradient_checkpointing=a.gradient_checkpointing,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = Timer()
    tr = GRPOTrainer(model=model, reward_funcs=accuracy, args=cfg, train_dataset=ds, processing_class=tok,
                     callbacks=[timer])
    tr.train()
    times = timer.times[1:]
    lens = [h["completions/mean_length"] for h in tr.state.log_history if "completions/mean_length" in h][1:]
    gen = sum(lens) * a.prompts * a.num_generations
    print(json.dumps({
        "peer": "TRL GRPOTrainer", "trl": __import__("trl").__version__, "torch": torch.__version__,
        "threads": a.threads, "prompts": a.prompts, "num_generations": a.num_generations,
        "max_completion_length": a.max_completion_length, "gradient_checkpointing": a.gradient_checkpointing,
        "s_per_step_mean": statistics.mean(times), "s_per_step": times,
        "mean_completion_tokens": statistics.mean(lens) if lens else None,
        "tokens_generated_per_step_second": gen / sum(times) if times else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


if __name__ == "__main__":
    main()
