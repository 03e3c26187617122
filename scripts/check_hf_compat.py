#!/usr/bin/env python3
"""Check prefer's checkpoints with Hugging Face transformers.

For every DIR given (or every sub-directory of a folder given) that holds an `expected.json`
written by prefer (examples/hf_fixtures.rs, or `prefer_expected.py`-style output): load it with
AutoModelForCausalLM / AutoTokenizer, and compare
  * token ids of each text with prefer's,
  * the rendered chat template with prefer's,
  * per-token log-probs of the scored tokens with prefer's (max abs difference).
Exit status 1 if anything differs beyond tolerance.

    python3 scripts/check_hf_compat.py hf-fixtures/ [--tol 1e-4]
"""
import json, os, sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


def check_reward(d, exp, tol):
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32)
    model.eval()
    ok, worst = True, 0.0
    for r in exp["rewards"]:
        ids = tok(r["text"])["input_ids"]
        if ids != r["ids"]:
            print(f"  {d}: token ids differ for {r['text']!r}")
            ok = False
        with torch.no_grad():
            logits = model(torch.tensor([r["ids"]])).logits[0]
        worst = max(worst, abs(logits[0].item() - r["reward"]))
        if "log_variance" in r:  # a Gaussian head: output 1 is log sigma^2
            worst = max(worst, abs(logits[1].item() - r["log_variance"]))
            if model.config.id2label.get(1) != "reward_log_variance":
                print(f"  {d}: id2label {model.config.id2label}")
                ok = False
    ok = ok and worst <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {d}: {type(model).__name__}, max |reward diff| {worst:.2e}")
    return ok


def check(d, tol):
    exp = json.load(open(os.path.join(d, "expected.json")))
    if "rewards" in exp:
        return check_reward(d, exp, tol)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    ok = True
    worst = 0.0
    for s in exp["sequences"]:
        ids = tok(s["text"])["input_ids"]
        if ids != s["ids"]:
            print(f"  {d}: token ids differ for {s['text']!r}:\n    hf     {ids}\n    prefer {s['ids']}")
            ok = False
        x = torch.tensor([s["ids"]])
        with torch.no_grad():
            logits = model(x).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        st = s["completion_start"]
        got = [lp[t - 1, s["ids"][t]].item() for t in range(st, len(s["ids"]))]
        diff = max(abs(a - b) for a, b in zip(got, s["logprobs"]))
        worst = max(worst, diff)
        if diff > tol:
            print(f"  {d}: log-probs differ by {diff:.2e} for {s['text']!r}")
            ok = False
    chat = exp.get("chat", {})
    if chat.get("rendered") is not None:
        r = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
        if r != chat["rendered"]:
            print(f"  {d}: chat template renders differently:\n    hf     {r!r}\n    prefer {chat['rendered']!r}")
            ok = False
    print(f"{'ok  ' if ok else 'FAIL'} {d}: {type(model).__name__}, max |log-prob diff| {worst:.2e}")
    return ok


def main():
    tol = 1e-4
    args = sys.argv[1:]
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i : i + 2]
    dirs = []
    for a in args:
        if os.path.isfile(os.path.join(a, "expected.json")):
            dirs.append(a)
        else:
            dirs += sorted(os.path.join(a, x) for x in os.listdir(a) if os.path.isfile(os.path.join(a, x, "expected.json")))
    if not dirs:
        sys.exit("no directory with expected.json given")
    results = [check(d, tol) for d in dirs]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
