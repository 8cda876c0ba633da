"""Progress of an evaluation that a person can trust: what runs now, and a time estimate from
measured costs.

Each attack's cost is measured as seconds per point of a batch it was offered (so the share of
points a cascade spares is in the number); the time left is the sum, over the batches and jobs
still to run, of the batch's points times that cost. Until every job has run once the estimate
says so instead of guessing. The line is refreshed on every forward pass of the model, so a log
gets a line at least every few seconds while an attack works (``PlainProgress``'s interval).
"""
from __future__ import annotations

import time

from robust_surgery._loops import _duration, work_progress
from robust_surgery.evaluation.budgets import format_eps

__all__ = ["EvalProgress"]


class EvalProgress:
    """Progress over ``batches`` (their sizes, in the order they run) × ``jobs`` (the plan)."""

    def __init__(self, enabled: bool, jobs: list, batch_sizes: list[int], n_batches: int):
        self.enabled = enabled
        self.bar = work_progress(enabled)
        self.jobs, self.sizes, self.n_batches = jobs, list(batch_sizes), n_batches
        self.cost: dict[str, tuple[float, int]] = {}  # job key -> (seconds, batch points offered)
        self.batch_i, self.job_i, self.label, self.t_job, self.attacked, self.calls = 0, 0, "", 0.0, 0, 0
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("evaluating", total=len(self.sizes) * max(len(self.jobs), 1), left="estimating…")
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start_job(self, batch_i: int, batch_no: int, job_i: int, job, attacked: int) -> None:
        """Job ``job_i`` of the plan starts on batch number ``batch_no`` (``batch_i``-th of this run) with
        ``attacked`` points still robust."""
        self.batch_i, self.job_i, self.attacked, self.calls = batch_i, job_i, attacked, 0
        self.t_job = time.monotonic()
        if not self.enabled:
            return
        self.label = (f"batch {batch_no + 1}/{self.n_batches} ε={format_eps(job.cfg.eps)} {job.variant} {job.label}: "
                      f"{attacked}/{self.sizes[batch_i]} points")
        self._show()

    def end_job(self, job) -> None:
        seconds, points = self.cost.get(job.key, (0.0, 0))
        self.cost[job.key] = (seconds + time.monotonic() - self.t_job, points + self.sizes[self.batch_i])
        if self.enabled:
            self.bar.update(self.task, advance=1, left=self.left())

    def tick(self) -> None:
        """A forward pass of the model happened (called by the attack target)."""
        self.calls += 1
        if self.enabled:
            self._show()

    def _show(self) -> None:
        self.bar.update(self.task, description=f"{self.label}, {self.calls} forward passes", left=self.left())

    def left(self) -> str:
        """The estimated time left, from measured seconds per offered point of each job."""
        if any(j.key not in self.cost for j in self.jobs):
            return "estimating (every attack runs once first)"
        per_point = {j.key: s / max(p, 1) for j, (s, p) in ((j, self.cost[j.key]) for j in self.jobs)}
        rest = sum(per_point[j.key] for j in self.jobs[self.job_i:]) * self.sizes[self.batch_i]
        rest -= min(time.monotonic() - self.t_job, per_point[self.jobs[self.job_i].key] * self.sizes[self.batch_i])
        rest += sum(self.sizes[self.batch_i + 1:]) * sum(per_point.values())
        return f"~{_duration(max(rest, 0.0))} left"
