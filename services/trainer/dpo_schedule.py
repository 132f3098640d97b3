"""The learning-rate schedule of prefloop's DPO loop: TRL's default shape (linear warmup, then cosine
to zero) as a plain function of the step, and where to stop it (`schedule_tail`). The loop needs every
step's factor before it runs, to cut the schedule's tail; transformers' `get_cosine_schedule_with_warmup`
is a LambdaLR bound to an optimizer. One difference: a warmup step's factor is
(step + 1) / warmup, so the first step trains (transformers' lambda gives step 0 a factor of 0).
`ScheduleTail` cuts TRL's own schedule by the same rule."""

import logging
import math

from transformers import TrainerCallback

log = logging.getLogger(__name__)


def cosine_with_warmup(step: int, *, warmup: int, steps: int) -> float:
    """The learning rate's factor at optimizer step `step` (0-based) of `steps`: TRL's default shape."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def tail_cut(factors: list[float], tail: float) -> int:
    """How many of the schedule's steps to run: the fewest whose remaining steps' learning rate adds up to
    at most `tail` of the whole schedule's (at least one step). A cosine's last steps move the weights
    little: steps 21-28 of SmolLM2's 28 (one warmup step) carry 4.4% of its learning rate, and in demo
    run 95 the drift monitor moved +3.2% to +3.7% over them while each step cost 5.4 s."""
    total, left = sum(factors), 0.0
    for run in range(len(factors), 0, -1):
        left += factors[run - 1]
        if left > tail * total:
            return run
    return min(1, len(factors))


def steps_to_run(factors: list[float], tail: float) -> int:
    """`tail_cut`, and a log line where it leaves steps unrun."""
    run = tail_cut(factors, tail)
    if run < len(factors):
        log.info("the schedule's last %d of %d steps carry %.1f%% of its learning rate: %d steps run",
                 len(factors) - run, len(factors), 100 * sum(factors[run:]) / (sum(factors) or 1), run)
    return run


class ScheduleTail(TrainerCallback):
    """`schedule_tail` in TRL's DPOTrainer (QLoRA): the schedule it built for its `max_steps` keeps its shape,
    and training ends where `tail_cut` ends prefloop's loop. Lowering `state.max_steps` to that step makes
    transformers' DefaultFlowCallback stop training there and BudgetCallback check it as the last step; this
    callback must come before BudgetCallback. A scheduler without per-step factors (not a LambdaLR) runs to
    its end, and says so."""

    def __init__(self, tail: float) -> None:
        self.tail = tail

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if not lambdas:
            log.warning("schedule_tail %.3f is not applied: %s has no per-step factors", self.tail,
                        type(lr_scheduler).__name__)
            return
        state.max_steps = steps_to_run([lambdas[0](step) for step in range(state.max_steps)], self.tail)
