"""The model-level judge: next-token loss of the repaired model and of the same model without its repairs.

Both models share everything but the tensors the repairs changed, so one streamed pass serves
both: the judge windows' block-0 inputs are captured once into two streams; each block of the
repaired output folder is loaded once, run on the first stream, then given its saved unrepaired
tensors (``loop.unrepaired``) and run on the second; at the end the model's own final norm and
head score both (``evaluation.streaming.head_logits``). One block in memory at a time; the
arithmetic is the streamed perplexity's, the same for both models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calib.activations import ActivationStream
from reconstruct.evaluation.perplexity import next_token_nll
from reconstruct.evaluation.streaming import head_logits
from reconstruct.loop.streams import run_stream
from reconstruct.modelio.block_io import install_module_tensors
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.progress import progress_bar


@torch.no_grad()
def judge_losses(model: LoadedModel, tokens: torch.Tensor, micro_batch: int,
                 unrepaired: Callable[[int], dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean next-token loss (nats per scored token) of ``model`` and of it without its repairs, on ``tokens``.

    Args:
        model: the repaired output folder, loaded (skeleton on meta; blocks streamed).
        tokens: (n, T) judge windows.
        micro_batch: windows per forward.
        unrepaired: ``unrepaired(index)`` → block ``index``'s tensors before its repair, by output
            name (``{}``: the repair changed nothing).

    Returns:
        ``(repaired loss, unrepaired loss)``.
    """
    n, seq_len = tokens.shape
    streams = [ActivationStream(n, seq_len, model.hidden_size, dtype=model.dtype, device=model.device, tier="device")
               for _ in range(2)]  # repaired, unrepaired: (n, T, H) each
    arguments = model.capture_block_inputs(tokens, micro_batch, streams[0].write)
    streams[1].copy_from(streams[0])
    for index in progress_bar(range(model.layout.n_blocks), desc="model check", unit="block"):
        with model.visiting_block(index) as block:
            forward = lambda hidden, block=block, index=index: arguments.run(block, index, hidden)  # noqa: E731
            run_stream(forward, streams[0], micro_batch, destination=streams[0])
            prefix = model.layout.block_prefix(index)
            before = {name.removeprefix(prefix): value for name, value in unrepaired(index).items()}
            if before:
                install_module_tensors(block, before, model.device, model.dtype)
            run_stream(forward, streams[1], micro_batch, destination=streams[1])
    totals, count = [0.0, 0.0], 0
    for set_index, rows, logits in head_logits(model, [tokens, tokens], streams, micro_batch, arguments.tuple_output):
        loss, scored = next_token_nll(logits, tokens[rows])  # the perplexity's arithmetic
        totals[set_index] += loss
        count += scored if set_index == 0 else 0
    return totals[0] / count, totals[1] / count
