"""Training schedules of the DeepSeek-V3 recipe as pure functions of progress.

Report numbers [R §4.1-4.2, spec §2.1], for 14.8T tokens in all:
- LR: linear warm-up 0 -> 2.2e-4 over 2K steps, constant until 10T tokens, cosine decay to 2.2e-5
  by 14.3T, constant 2.2e-5 to 14.633T, then 7.3e-6 for the last 167B tokens.
- Batch: 3072 -> 15360 sequences of 4096 tokens over the first 469B tokens, then constant.
- MoE bias update speed gamma: 0.001 until 14.3T tokens, then 0.
- MTP loss weight lambda: 0.3 until 10T tokens, then 0.1.

Every run here is far shorter than 14.8T tokens, so each schedule is given as fractions of the run.
The functions hold no state (nothing to checkpoint: they are recomputed from the step or token count
on resume) and do not touch torch; the trainer writes the values into the optimizer and the model.
"""

import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate


@dataclass(frozen=True)
class LRSchedule:
    """Warmup-stable-decay, indexed by optimizer step.

    Linear warm-up to `peak_lr` over `warmup_steps`, constant until `decay_start_frac` of
    `total_steps`, cosine decay to `final_lr_frac * peak_lr` at `decay_end_frac`, held there, and
    from `tail_start_frac` on `tail_lr_frac * peak_lr` (when given).

    The defaults (decay from 0.8 to the end, no tail) are our choice for short runs: longer at peak
    LR, UNCONFIRMED as better.  `REPORT_SHAPE` gives the report's five phases as fractions of the
    run (`dsv3 train --lr-shape report`): decay from 10T to 14.3T of 14.8T tokens, 2.2e-5 to 14.633T,
    7.3e-6 to the end.  The report indexes the phases by tokens; under a batch ramp steps and tokens are
    not proportional (the ramp covers ~3 % of the report's tokens but more of its steps), so given
    `token_fraction` (`BatchPlan.fraction`: the share of the run's tokens before a step) the phase
    boundaries are the steps where that share passes each fraction, as the bias freeze and the
    MTP-weight switch are.  The warm-up stays in steps (the report gives 2K steps), and within the cosine
    steps stand in for tokens (the same once the ramp is over, as it is long before the report's decay).
    `final_lr_frac = 0.1` is the report's 2.2e-4 -> 2.2e-5.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    decay_start_frac: float = 0.8
    final_lr_frac: float = 0.1
    decay_end_frac: float = 1.0
    tail_start_frac: float = 1.0
    tail_lr_frac: float | None = None
    token_fraction: Callable[[int], float] | None = field(default=None, compare=False)  # None: steps are tokens

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                             f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
        if not 0.0 <= self.decay_start_frac <= self.decay_end_frac <= self.tail_start_frac <= 1.0:
            raise ValueError("need 0 <= decay_start_frac <= decay_end_frac <= tail_start_frac <= 1, got "
                             f"{self.decay_start_frac}, {self.decay_end_frac}, {self.tail_start_frac}")
        if not 0.0 <= self.final_lr_frac <= 1.0 or not 0.0 <= (self.tail_lr_frac or 0.0) <= 1.0:
            raise ValueError("final_lr_frac and tail_lr_frac must lie in [0, 1]")

    @classmethod
    def for_run(cls, peak_lr: float, total_steps: int, warmup_frac: float = 0.05,
                max_warmup_steps: int = 2000, **fields: float) -> "LRSchedule":
        """Warm-up scaled to the run: min(max_warmup_steps, max(1, round(warmup_frac * total_steps))).

        2000 is the report's warm-up; 5% keeps short runs (a 200-step demo gets 10 steps) from
        spending most of their steps warming up. `fields` go to the constructor.
        """
        warmup = min(max_warmup_steps, max(1, round(warmup_frac * total_steps)), total_steps)
        return cls(peak_lr, warmup, total_steps, **fields)

    @property
    def decay_start(self) -> int:
        # The plateau may be empty, but decay never starts before warm-up ends.
        return max(self.warmup_steps, self._step_at(self.decay_start_frac))

    @property
    def decay_end(self) -> int:
        # the last step trained is total_steps - 1: a decay "to the end" reaches its floor there, not one
        # step after the run (a 10-step run's last step would otherwise train at 0.55x the peak, not 0.1x)
        return max(self.decay_start, min(self._step_at(self.decay_end_frac), self.total_steps - 1))

    def _step_at(self, frac: float) -> int:
        if self.token_fraction is not None:  # the last step that starts within the first `frac` of the tokens
            return bisect_right(range(self.total_steps + 1), frac + 1e-12, key=self.token_fraction) - 1
        # + 1e-9: a ratio such as 14.633 / 14.8 of 148,000 steps is 146,329.99999999997 in floats
        return int(frac * self.total_steps + 1e-9)

    def describe(self) -> str:
        """The phases after warm-up, for the start-up line."""
        text = f"cosine from step {self.decay_start}"
        if self.decay_end < self.total_steps:
            text += f" to {self.decay_end} (x{self.final_lr_frac:.3g})"
        if self.tail_lr_frac is not None:
            text += f", x{self.tail_lr_frac:.3g} from step {self._step_at(self.tail_start_frac)}"
        return text

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first update uses a small non-zero LR, and step warmup_steps-1 hits peak.
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        if self.tail_lr_frac is not None and step >= self._step_at(self.tail_start_frac):
            return self.tail_lr_frac * self.peak_lr
        final = self.final_lr_frac * self.peak_lr
        if step >= self.decay_end:
            return final
        progress = (step - self.decay_start) / (self.decay_end - self.decay_start)
        return final + (self.peak_lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# The report's LR phases as fractions of a 14.8T-token run [R §4.2, spec §2.1]
REPORT_SHAPE = dict(decay_start_frac=10 / 14.8, decay_end_frac=14.3 / 14.8, final_lr_frac=2.2e-5 / 2.2e-4,
                    tail_start_frac=14.633 / 14.8, tail_lr_frac=7.3e-6 / 2.2e-4)
LR_SHAPES = ("wsd", "report")


def lr_schedule(shape: str, peak_lr: float, total_steps: int, warmup_steps: int | None, decay_start_frac: float,
                final_lr_frac: float, plan: "BatchPlan | None" = None) -> LRSchedule:
    """The trainers' schedule: "wsd" (warm-up, stable until decay_start_frac, cosine to final_lr_frac at
    the end) or "report" (REPORT_SHAPE; decay_start_frac and final_lr_frac are then the report's).
    warmup_steps None: 5 % of the run, at most the report's 2000.  A `plan` with a batch ramp places the
    phases by tokens (`LRSchedule.token_fraction`); without a ramp steps and tokens are proportional."""
    if shape not in LR_SHAPES:
        raise ValueError(f"unknown LR shape {shape!r}; choose from {LR_SHAPES}")
    warmup = warmup_steps if warmup_steps is not None else min(2000, max(1, round(0.05 * total_steps)))
    fields = REPORT_SHAPE if shape == "report" else dict(decay_start_frac=decay_start_frac, final_lr_frac=final_lr_frac)
    token_fraction = plan.fraction if plan is not None and plan.ramped else None
    return LRSchedule(peak_lr, min(warmup, total_steps), total_steps, **fields, token_fraction=token_fraction)


def batch_size_at(step: int, start: int, end: int, ramp_steps: int, *, multiple_of: int = 1) -> int:
    """Global batch size (sequences) at `step`: linear from `start` at step 0 to `end` at `ramp_steps`.

    The report ramps 3072 -> 15360 "gradually" over the first 469B tokens; the shape is UNCONFIRMED,
    linear in steps is our choice (~12K steps at the report's scale [spec §2.1, D]). The size is
    rounded to the nearest `multiple_of` (e.g. micro-batch x data-parallel ranks, so that gradient
    accumulation divides evenly) and clamped to [start, end]. `ramp_steps <= 0` means constant `end`.
    """
    if multiple_of < 1 or start % multiple_of or end % multiple_of:
        raise ValueError(f"start={start} and end={end} must be multiples of multiple_of={multiple_of}")
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    size = start + (end - start) * max(step, 0) / ramp_steps
    size = round(size / multiple_of) * multiple_of
    return min(max(size, min(start, end)), max(start, end))


class BatchPlan:
    """The run's global batch per step (the ramp, then constant) and, from it, the share of the run's tokens
    seen before a step: the bias freeze and the MTP-weight switch are token-indexed in the report, and
    under the ramp steps and tokens are not proportional.  Without a ramp the share is step / steps exactly."""

    def __init__(self, steps: int, end: int, start: int | None = None, ramp_steps: int = 0, multiple_of: int = 1):
        self.steps, self.end = steps, end
        ramp = range(min(ramp_steps, steps)) if start else range(0)
        self.prefix = [0, *accumulate(batch_size_at(s, start, end, ramp_steps, multiple_of=multiple_of) for s in ramp)]
        self.total = self.sequences_before(steps)

    @property
    def ramped(self) -> bool:
        """Whether any step's batch differs from the final one (else token shares are step shares)."""
        return any(self.batch_size(s) != self.end for s in range(len(self.prefix) - 1))

    def batch_size(self, step: int) -> int:
        ramped = len(self.prefix) - 1
        return self.prefix[step + 1] - self.prefix[step] if step < ramped else self.end

    def sequences_before(self, step: int) -> int:
        ramped = len(self.prefix) - 1
        return self.prefix[min(step, ramped)] + max(0, step - ramped) * self.end

    def fraction(self, step: int) -> float:
        """Share of the run's tokens (sequences, at one seq_len) seen before `step`, in [0, 1]."""
        return self.sequences_before(step) / self.total


def bias_update_speed(tokens_seen: float, total_tokens: float, gamma: float = 0.001,
                      freeze_frac: float = 14.3 / 14.8) -> float:
    """Aux-loss-free balancing speed: `gamma` (report: 0.001) until `freeze_frac` of training, then 0.

    The report freezes the expert biases for the last 500B of 14.8T tokens. Steps work in place of
    tokens if both arguments use them.
    """
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    return gamma if tokens_seen < freeze_frac * total_tokens else 0.0


def mtp_weight(tokens_seen: float, total_tokens: float, early: float = 0.3, late: float = 0.1,
               switch_frac: float = 10 / 14.8) -> float:
    """MTP loss weight lambda: `early` (0.3) for the first 10T of 14.8T tokens, then `late` (0.1).

    A step change, as the report describes it. Steps work in place of tokens if both arguments use them.
    """
    if total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    return early if tokens_seen < switch_frac * total_tokens else late
