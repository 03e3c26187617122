"""TRL 1.16's DPOTrainer on the same job as `prefer bench dpo`: the same HF checkpoint (made by
`prefer convert` from the GGUF, with the tokenizer prefer uses written as tokenizer.json), the
same pairs in the same order (the rows `prefer bench dpo --rows-out` trained on, none of them
longer than max_length, so neither side truncates), the same batch size, β, learning rate and
number of steps, on the CPU. Times each optimizer step after a warm-up one and prints one JSON
line: s/step, peak RSS. Run by scripts/bench-dpo-vs-trl.sh, which runs prefer beside it.
"""

import argparse
import json
import resource
import statistics

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from timing import Timer
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


class InOrder(DPOTrainer):
    """The rows in file order, as prefer's bench (shuffle = false) takes them."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the rows prefer trained on (JSONL prompt/chosen/rejected)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precompute-ref-log-probs", action="store_true")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [json.loads(l) for l in open(a.data) if l.strip()]
    n = (a.steps + 1) * a.batch_size
    if len(rows) < n:
        raise SystemExit(f"{a.data}: {len(rows)} rows, {n} needed")
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows[:n]])
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    cfg = DPOConfig(
        output_dir="/tmp/trl-dpo-bench", per_device_train_batch_size=a.batch_size, max_length=a.max_length,
        max_steps=a.steps + 1, learning_rate=1e-6, beta=0.1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=a.bf16, precompute_ref_log_probs=a.precompute_ref_log_probs,
        gradient_checkpointing=a.gradient_checkpointing, dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = Timer()
    tr = InOrder(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    tr.train()
    times = timer.times[1:]
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    print(json.dumps({
        "peer": "TRL DPOTrainer", "trl": __import__("trl").__version__, "torch": torch.__version__,
        "threads": a.threads, "batch_pairs": a.batch_size, "max_length": a.max_length,
        "reference": "precomputed" if a.precompute_ref_log_probs else "live",
        "dtype": "bf16" if a.bf16 else "f32", "gradient_checkpointing": a.gradient_checkpointing,
        "s_per_step_median": statistics.median(times), "s_per_step": times, "losses": losses,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


if __name__ == "__main__":
    main()
