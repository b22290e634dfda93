"""The streamed step: the whole model's loss and gradients with one block in memory at a time.

Forward: capture block 0's inputs of every micro-batch, then load block 0, run every micro-batch
through it under ``no_grad``, release it, block 1, ...; every block-boundary hidden state is kept in
an ``ActivationStream`` (device / CPU / disk tier). Head: the model's own forward with every block
replaying the last hidden state (``evaluation.streaming``), with autograd, gives the loss and
``d loss / d last hidden``. Backward: blocks in reverse; each is loaded, its forward recomputed with
autograd from its stored input per micro-batch, and backpropagated with the incoming gradient; the
gradient of its input goes to the block below, and its input is released (while block ``k`` is
loaded in the backward, only the inputs of blocks ``0 .. k`` are held). One step reads every block twice;
with the loader's background reads each read happens while the block before it computes (the backward's
first, the last block again, while the head runs).

Frozen: the embeddings, the final norm and the LM head (loaded once, kept for the session), and every
block weight; only the trainables get gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from calib.activations import ActivationStream
from calib.capture import BlockArguments, capture_block_inputs
from reconstruct.evaluation.streaming import load_head, replaying_blocks
from reconstruct.modelio.block_io import release_module_weights
from reconstruct.parallel import distributed
from reconstruct.retrain.distill import TeacherTopK
from reconstruct.retrain.loss import Objective, scored_tokens
from reconstruct.retrain.session import BlockLoader

logger = logging.getLogger(__name__)


def micro_batches(n: int, micro_batch: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``micro_batch`` rows covering ``range(n)``."""
    for start in range(0, n, micro_batch):
        yield slice(start, min(start + micro_batch, n))


class StreamedModel:
    """The model for retraining, streamed from its shards one block at a time.

    Args:
        loader: loads blocks with their trainables (and calls the hooks).
        micro_batch: windows per block forward.
        tier: where boundary hidden states live: "device", "cpu" or "disk".
        scratch: folder for disk-tier stream files.
        objective: the per-token loss, computed in the head per micro-batch (default: the causal-LM loss).
    """

    def __init__(self, loader: BlockLoader, micro_batch: int, tier: str, scratch: Path,
                 objective: Objective = Objective()) -> None:
        self.loader = loader
        self.loaded = loader.loaded
        self.micro_batch = micro_batch
        self.objective = objective
        self.tier = tier
        self.scratch = scratch
        self.outside = self.loaded.load_outside_blocks() + [load_head(self.loaded)]
        self.arguments: BlockArguments | None = None  # every block's arguments, captured once per session
        self.files: set[Path] = set()  # disk-tier stream files, removed by close()

    def close(self) -> None:
        """Release the modules outside the blocks; remove the disk-tier stream files."""
        for module in self.outside:
            release_module_weights(module)
        self.loader.trainables.workspace.clear()  # the adapters' scratch and spare effective weights
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()

    # ------------------------------------------------------------------ pieces
    def _stream(self, name: str, tokens: torch.Tensor) -> ActivationStream:
        n, seq_len = tokens.shape
        path = self.scratch / f"retrain-{name}.bin"
        if self.tier == "disk":
            self.files.add(path)
        return ActivationStream(n, seq_len, self.loaded.hidden_size, dtype=self.loaded.dtype,
                                device=self.loaded.device, tier=self.tier, disk_path=path)

    def _capture(self, tokens: torch.Tensor, stream: ActivationStream) -> None:
        """Block-0 inputs of every window into ``stream``; every block's arguments once per session."""
        arguments = capture_block_inputs(self.loaded.model, self.loaded.blocks, tokens, self.micro_batch,
                                         stream.write, self.loaded.device, check=self.arguments is None)
        if self.arguments is None:
            self.arguments = arguments

    def _block_forward(self, block, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on (b, T, H) ``hidden`` with its own arguments; returns (b, T, H)."""
        return self.arguments.run(block, index, hidden)

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, keep_all: bool) -> list[ActivationStream]:
        """Boundary hidden states: every block's input and the last output (``keep_all``), else the last only.

        Without ``keep_all`` two streams take turns (validation needs no block inputs).
        """
        streams = [self._stream("boundary-0", tokens)]
        self._capture(tokens, streams[0])
        spare: ActivationStream | None = None
        n_blocks = self.loaded.layout.n_blocks
        for index in range(n_blocks):
            source = streams[-1]
            target = self._stream(f"boundary-{index + 1}", tokens) if keep_all or spare is None else spare
            # next: the following block; after the last, the backward's first (that block again) or none
            then = index + 1 if index + 1 < n_blocks else (index if keep_all else None)
            with self.loader.session(index, then) as block:
                for rows in micro_batches(tokens.shape[0], self.micro_batch):
                    target.write(rows, self._block_forward(block, index, source.read(rows)))
            if keep_all:
                streams.append(target)
            else:
                spare, streams[-1] = source, target
        return streams

    def _head(self, tokens: torch.Tensor, last: ActivationStream, grads: ActivationStream | None,
              total_tokens: int, teacher: TeacherTopK | None) -> float:
        """Summed token loss over ``tokens``; with ``grads``, d(mean loss)/d(last hidden) into it.

        ``teacher``: the top-k rows of ``tokens``; each micro-batch's loss takes its own rows only.
        """
        model, device = self.loaded.model, self.loaded.device
        replay: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        with replaying_blocks(self.loaded.blocks, replay, self.arguments.tuple_output), torch.set_grad_enabled(grads is not None):
            for rows in micro_batches(tokens.shape[0], self.micro_batch):
                hidden = last.read(rows).requires_grad_(grads is not None)  # (b, T, H)
                replay["hidden"] = hidden
                batch = tokens[rows].to(device)  # (b, T)
                logits = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
                loss = self.objective.loss_sum(logits, batch, teacher and teacher.rows(rows))
                if grads is not None:
                    (loss / total_tokens).backward()
                    grads.write(rows, hidden.grad)
                loss_sum += float(loss.detach())
        return loss_sum

    # ------------------------------------------------------------------ API
    def materialise_trainables(self) -> None:
        """Load every block once so its trainables exist (before restoring a checkpoint into them)."""
        n_blocks = self.loaded.layout.n_blocks
        for index in range(n_blocks):
            with self.loader.session(index, index + 1 if index + 1 < n_blocks else None):
                pass

    def loss(self, tokens: torch.Tensor, teacher: TeacherTopK | None = None) -> float:
        """Mean token loss over the (n, T) windows, no gradients (validation); ``teacher``: their top-k rows."""
        last = self._forward(tokens, keep_all=False)[-1]
        with torch.no_grad():
            return self._head(tokens, last, None, scored_tokens(tokens), teacher) / scored_tokens(tokens)

    def loss_and_gradients(self, tokens: torch.Tensor, total_tokens: int | None = None,
                           teacher: TeacherTopK | None = None) -> float:
        """Accumulate d(loss)/d(trainables) of this step into their ``.grad``; returns the summed token loss.

        Args:
            tokens: (n, T) this process's windows of the step.
            total_tokens: scored tokens of the whole step (all ranks); default: those of ``tokens``.
            teacher: the teacher's top-k rows of ``tokens`` (a distillation loss needs them).
        """
        total_tokens = total_tokens or scored_tokens(tokens)
        streams = self._forward(tokens, keep_all=True)  # [input of block 0, ..., input of block n-1, last output]
        grads = self._stream("grad", tokens)
        loss_sum = self._head(tokens, streams.pop(), grads, total_tokens, teacher)  # the last output: the head alone
        for index in reversed(range(self.loaded.layout.n_blocks)):
            inputs = streams.pop()  # block ``index``'s input, needed by no block below: released after its backward
            # next: the block below; after block 0, block 0 again (the next step's or evaluation's forward)
            with self.loader.session(index, index - 1 if index > 0 else 0) as block:
                for rows in micro_batches(tokens.shape[0], self.micro_batch):
                    hidden = inputs.read(rows).requires_grad_(index > 0)  # (b, T, H)
                    with torch.enable_grad():
                        output = self._block_forward(block, index, hidden)  # (b, T, H)
                        output.backward(grads.read(rows))
                    if index > 0:
                        grads.write(rows, hidden.grad)
                distributed.all_reduce_grads_(self.loader.trainables.by_block[index])
                self.loader.hooks.block_gradients_ready(index, block)
        return loss_sum
