"""Lookahead with a rising decay, as airbench94 uses it: a slow copy of the weights.

Every ``every`` optimizer steps the slow copy moves toward the trained (fast)
weights by ``1 - decay`` and the fast weights are reset to it. The decay,
``0.95**every * (step / total_steps)**3``, is near 0 early (the slow copy
follows closely) and rises toward ``0.95**every`` at the end (it averages the
last updates). At the run's last step (``total_steps``; a run that
``--max-steps`` stops earlier never reaches it) the model takes the slow weights. All floating
point state is included: parameters and BatchNorm's running statistics.
"""

from __future__ import annotations

import torch
from torch import nn

DECAY_PER_STEP = 0.95  # airbench's: 0.95**5 per update at its 5 steps per update


class Lookahead:
    """The slow weights of ``model`` (its floating point ``state_dict`` entries).

    Create it after the model is on its device and initialised (it keeps the model's tensors); call
    :meth:`after_step` after every optimizer step with the step count so far.
    Its :attr:`slow` weights belong in a checkpoint (cifar/checkpoint.py saves them as a
    tensor group of :mod:`repro.checkpoint`): resuming without them would restart the average.
    """

    def __init__(self, model: nn.Module, every: int, total_steps: int) -> None:
        if every < 1 or total_steps < 1:
            raise ValueError(f"every and total_steps must be positive, got {every} and {total_steps}")
        self.every = every
        self.total_steps = total_steps
        # state_dict()'s tensors share the model's storage: kept once, they stay the model's
        # own (load_state_dict copies into them), and an update is two foreach calls.
        self.fast = {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
        self.slow = {name: tensor.detach().clone() for name, tensor in self.fast.items()}

    def decay(self, step: int) -> float:
        """How much of the slow weights an update at ``step`` keeps."""
        return DECAY_PER_STEP**self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Update at every ``every``-th step; at the last step, give the model the slow weights."""
        if step % self.every == 0:
            self._update(self.decay(step))
        if step == self.total_steps:
            self._update(1.0)

    def _update(self, decay: float) -> None:
        slow, fast = list(self.slow.values()), list(self.fast.values())
        torch._foreach_lerp_(slow, fast, 1 - decay)
        torch._foreach_copy_(fast, slow)
