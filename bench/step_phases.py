"""Where a retraining step's time goes: wall-clock timers wrapped around the trainer's pieces.

``PhaseClock.install()`` wraps (for the ``with`` body) the functions that make up a step with timers
that nest: a phase's time excludes the phases called inside it (an adapter's merge inside the forward
counts as adapter arithmetic, not forward). On the CPU every op runs synchronously, so wall time is
where the work is; on a GPU the timers only measure launches (pass ``sync``). What no timer covers is
bookkeeping: the step's wall time minus every phase.

Phases: ``forward`` (the model's forward with autograd, the loss included), ``recompute`` (streamed:
each block's forward again in the backward), ``head`` (streamed: the final norm and LM head, forward),
``backward``, ``adapter merge`` (the effective weight ``W + M ⊙ s B A`` of the low-rank methods),
``adapter gradients`` (``d/dA``, ``d/dB`` from the weight's gradient, where they are not autograd's),
``norm/bias cast`` (the masters' cast into the block), ``optimizer`` (clipping, AdamW, zero_grad),
``io`` (a block's weights read, attached and released: the streamed path), ``boundary states`` (the
streamed path's hidden states read and written).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import torch


class PhaseClock:
    """Exclusive wall seconds per phase, accumulated over the steps run inside ``install()``."""

    def __init__(self, sync=None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [phase, seconds of the phases inside it]
        self._sync = sync or (lambda: None)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        started = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - started
            _, inner = self._stack.pop()
            self.totals[name] += elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed

    def _wrap(self, function, name):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            phase = name(*args, **kwargs) if callable(name) else name
            if phase is None:
                return function(*args, **kwargs)
            with self.phase(phase):
                return function(*args, **kwargs)

        return timed

    @contextmanager
    def _patched(self, owner, attr: str, name):
        original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if original is None:
            yield
            return
        setattr(owner, attr, self._wrap(original, name))
        try:
            yield
        finally:
            setattr(owner, attr, original)

    @contextmanager
    def install(self):
        """Wrap the step's pieces (those that exist in this version of the code) for the ``with`` body."""
        from calib.activations import ActivationStream
        from pruners import lowrank, lowrank_function
        from reconstruct.methods import bias_norm
        from reconstruct.retrain import resident, session, streamed

        def grad_phase(on: str, off: str | None):
            return lambda *args, **kwargs: on if torch.is_grad_enabled() else off

        patches = [
            (resident.ResidentModel, "_loss_sum", grad_phase("forward", "validation")),
            (streamed.StreamedModel, "_block_forward", grad_phase("recompute", "forward")),
            (streamed.StreamedModel, "_head", "head"),
            (torch.Tensor, "backward", "backward"),
            (torch.optim.AdamW, "step", "optimizer"),
            (torch.optim.Optimizer, "zero_grad", "optimizer"),
            (torch.nn.utils, "clip_grad_norm_", "optimizer"),
            (session.BlockLoader, "load", "io"),
            (session, "release_module_weights", "io"),
            (session, "release_free_heap", "io"),
            (ActivationStream, "read", "boundary states"),
            (ActivationStream, "write", "boundary states"),
            (lowrank.LowRankLinear, "effective_weight", "adapter merge"),
            (lowrank_function, "effective_weight_of", "adapter merge"),
            (lowrank_function, "adapter_gradients", "adapter gradients"),
            (bias_norm.MasterParam, "_inject", "norm/bias cast"),
        ]
        with ExitStack() as stack:
            for owner, attr, name in patches:
                stack.enter_context(self._patched(owner, attr, name))
            yield self

    def per_step(self, steps: int, wall: float) -> dict[str, float]:
        """Seconds per step by phase, ``bookkeeping`` the rest of the wall time, largest first."""
        shares = {name: seconds / steps for name, seconds in self.totals.items() if name != "validation"}
        shares["bookkeeping"] = wall / steps - sum(shares.values())
        return {name: round(value, 4) for name, value in sorted(shares.items(), key=lambda item: -item[1])}
