"""The resident path: the whole model loaded once with every block's trainables, ordinary autograd.

Used when the model fits the device. Same micro-batch order and the same loss scaling as the
streamed step (``loss / step tokens`` per micro-batch), so the two give the same gradients.
"""

from __future__ import annotations

import torch

from reconstruct.evaluation.streaming import load_head
from reconstruct.modelio.block_io import release_module_weights
from reconstruct.parallel import distributed
from reconstruct.retrain.distill import TeacherTopK
from reconstruct.retrain.loss import Objective, scored_tokens
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.streamed import micro_batches


class ResidentModel:
    """Every block loaded with its trainables attached (``hooks.block_loaded`` once per block).

    Args:
        loader: loads blocks with their trainables.
        micro_batch: windows per forward/backward.
        objective: the per-token loss (default: the causal-LM loss).
    """

    def __init__(self, loader: BlockLoader, micro_batch: int, objective: Objective = Objective()) -> None:
        self.loader = loader
        self.loaded = loader.loaded
        self.micro_batch = micro_batch
        self.objective = objective
        self.outside = self.loaded.load_outside_blocks() + [load_head(self.loaded)]
        n_blocks = self.loaded.layout.n_blocks
        self.handles = [loader.load(index, index + 1 if index + 1 < n_blocks else None)[2] for index in range(n_blocks)]

    def close(self) -> None:
        """Drop the trainables' wrappers and release every weight."""
        for handle in self.handles:
            handle.discard()
        self.loader.trainables.workspace.clear()  # the adapters' scratch and their effective weights
        for module in [*self.loaded.blocks, *self.outside]:
            release_module_weights(module)

    def materialise_trainables(self) -> None:
        """Nothing to do: every block's trainables were attached when the model was loaded."""

    def _loss_sum(self, batch: torch.Tensor, teacher: TeacherTopK | None) -> torch.Tensor:
        """Summed token loss of (b, T) windows (a scalar, in the graph when grad is enabled)."""
        batch = batch.to(self.loaded.device)
        logits = self.loaded.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
        return self.objective.loss_sum(logits, batch, teacher)

    @torch.no_grad()
    def loss(self, tokens: torch.Tensor, teacher: TeacherTopK | None = None) -> float:
        """Mean token loss over the (n, T) windows, no gradients (validation); ``teacher``: their top-k rows."""
        total = sum(float(self._loss_sum(tokens[rows], teacher and teacher.rows(rows)))
                    for rows in micro_batches(tokens.shape[0], self.micro_batch))
        return total / scored_tokens(tokens)

    def loss_and_gradients(self, tokens: torch.Tensor, total_tokens: int | None = None,
                           teacher: TeacherTopK | None = None) -> float:
        """Accumulate d(loss)/d(trainables) into their ``.grad``; returns the summed token loss (see StreamedModel)."""
        total_tokens = total_tokens or scored_tokens(tokens)
        loss_sum = 0.0
        for rows in micro_batches(tokens.shape[0], self.micro_batch):
            with torch.enable_grad():
                loss = self._loss_sum(tokens[rows], teacher and teacher.rows(rows))
                (loss / total_tokens).backward()
            loss_sum += float(loss.detach())
        trainables = self.loader.trainables
        for index in reversed(range(self.loaded.layout.n_blocks)):
            distributed.all_reduce_grads_(trainables.by_block[index])
            self.loader.hooks.block_gradients_ready(index, self.loaded.blocks[index])
        return loss_sum
