"""Run TRL's own GRPO loss (`GRPOTrainer._compute_loss`, TRL 1.16) on fixed per-token log-probs,
advantages and masks, and write the cases with TRL's loss, gradient and metrics as JSON: the
fixture `tests/fixtures/trl_grpo_losses.json` that prefer's tests compare its losses with.

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.15.0 trl==1.16.0
    /tmp/trlvenv/bin/python scripts/peers/trl_grpo_loss_cases.py > tests/fixtures/trl_grpo_losses.json

No model is loaded: `_get_per_token_logps_and_entropies` is replaced by the fixed tensors, and
the trainer object is a stand-in holding the attributes `_compute_loss` reads.
"""

import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl import GRPOTrainer

torch.manual_seed(0)
LENGTHS = [4, 2, 3, 4]  # completion tokens of the four completions
B, T = len(LENGTHS), max(LENGTHS)
ACCUM = 2


class Accel:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def run(case, logps_init, old, ref, adv, entropies, mask):
    loss_type, level, beta, quantile, delta = (
        case["loss_type"], case["level"], case["beta"], case["top_entropy_quantile"], case["delta"])
    logps = logps_init.clone().requires_grad_(True)
    args = SimpleNamespace(
        use_bias_correction_kl=False, delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
        steps_per_generation=ACCUM, gradient_accumulation_steps=ACCUM,
    )
    me = SimpleNamespace(
        args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta,
        epsilon_low=0.2, epsilon_high=0.28, top_entropy_quantile=quantile, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=ACCUM, accelerator=Accel(),
        max_completion_length=6, _metrics={"train": defaultdict(list)}, model=SimpleNamespace(training=True),
    )
    me._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    me.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(me, e, m, t)
    me.get_gamma_weights = GRPOTrainer.get_gamma_weights
    me.get_off_policy_mask = None
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum().double(),
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(me, None, inputs)
    loss.backward()
    grad = logps.grad
    packed = lambda x: [[float(x[i, t]) for t in range(LENGTHS[i])] for i in range(B)]
    metrics = {k: v[-1] for k, v in me._metrics["train"].items() if v}
    return float(loss), packed(grad), metrics


def main():
    base = -torch.rand(B, T, dtype=torch.float64) * 3.0
    old = base + (torch.rand(B, T, dtype=torch.float64) - 0.5) * 0.6   # ratios e^±0.3: some clip
    ref = base + (torch.rand(B, T, dtype=torch.float64) - 0.5) * 1.0
    entropies = torch.rand(B, T, dtype=torch.float64) * 2.0
    adv = torch.tensor([[0.7], [-1.2], [0.4], [-0.3]], dtype=torch.float64)
    full = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in LENGTHS], dtype=torch.long)
    truncated = full.clone()
    truncated[3] = 0  # completion 3 cut at max_completion_length and masked out
    packed = lambda x: [[float(x[i, t]) for t in range(LENGTHS[i])] for i in range(B)]
    cases = []
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]:
        for level in ["token", "sequence"]:
            for beta, quantile, delta, masked in [(0.0, 1.0, None, False), (0.04, 0.5, 1.5, True)]:
                case = {"loss_type": loss_type, "level": level, "beta": beta,
                        "top_entropy_quantile": quantile, "delta": delta, "keep": [True, True, True, not masked]}
                mask = truncated if masked else full
                loss, grad, metrics = run(case, base, old, ref, adv, entropies, mask)
                case.update({"trl_loss": loss, "trl_grad": grad, "trl_metrics": metrics})
                cases.append(case)
    json.dump({
        "source": f"TRL {trl.__version__} GRPOTrainer._compute_loss, torch {torch.__version__}, float64",
        "accumulation": ACCUM, "epsilon_low": 0.2, "epsilon_high": 0.28, "max_completion_length": 6,
        "logps": packed(base), "old": packed(old), "ref": packed(ref), "entropies": packed(entropies),
        "advantages": [float(a) for a in adv[:, 0]], "cases": cases,
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
