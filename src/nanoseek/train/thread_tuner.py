"""CPU training on the faster of 1 thread and all threads (the speedrun's and SFT's `tune_threads`)."""

from __future__ import annotations

import torch


class ThreadTuner:
    """Runs CPU training on the faster of 1 thread and all threads, re-measured every `every` steps.

    On a machine shared with other busy processes, OpenMP threads spinning while they wait for each other
    made the speedrun model's step ~6x slower with two threads than with one (measured on the 2-core box);
    on an idle machine two threads win. The load changes during a run, so the choice is re-checked: every
    `every` steps, `trial` steps run with the other count and the faster recent median is kept.
    `restore()` puts back the caller's thread count (the trainer calls it when training ends).
    """

    def __init__(self, every: int = 50, trial: int = 3, start: int = 5):
        self.most = torch.get_num_threads()  # the caller's setting, restored at the end
        self.every, self.trial, self.start = every, trial, start
        self.best = self.most
        self.recent: dict[int, list[float]] = {1: [], self.most: []}

    def _other(self) -> int:
        return 1 if self.best == self.most else self.most

    def before_step(self, step: int) -> None:
        if self.most > 1:
            trying = step >= self.start and (step - self.start) % self.every < self.trial
            torch.set_num_threads(self._other() if trying else self.best)

    def after_step(self, step: int, seconds: float) -> None:
        if self.most <= 1:
            return
        n = torch.get_num_threads()
        self.recent[n] = (self.recent[n] + [seconds])[-self.trial :]
        decide = step >= self.start and (step - self.start) % self.every == self.trial - 1
        if decide and all(self.recent.values()):
            medians = {k: sorted(v)[len(v) // 2] for k, v in self.recent.items()}
            self.best = min(medians, key=medians.get)
            torch.set_num_threads(self.best)

    def restore(self) -> None:
        torch.set_num_threads(self.most)
