"""What the TRL peer scripts share: a callback that times each optimizer step."""

import time

from transformers import TrainerCallback


class Timer(TrainerCallback):
    """Wall time of each optimizer step, in `times`."""

    def __init__(self):
        self.times, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)
