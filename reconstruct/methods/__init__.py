"""Layer-wise reconstruction methods (PERP, Zimmer et al., arXiv 2312.15230).

After a block is pruned, a small set of parameters is trained so the pruned block reproduces the dense
block's outputs, then folded back into plain weights:

    handle = attach_method(spec.method, block, linears, keep_masks, rank=spec.rank, alpha=spec.alpha,
                           bias_linears=bias_linears, seed=block_seed)
    result = train_reconstruction(forward, handle.trainable_parameters(), inputs, targets, spec, seed=block_seed)
    report = handle.merge(allow_dense_merge=spec.allow_dense_merge)

Methods: none; bias (linear biases); ln (norm weights and biases); bias-ln (both); masklora
(``W + M ⊙ BA``); scalelora (``W ⊙ BA``); lora (``W + BA``, densifies when merged). Pruned weights
stay exactly zero through every method but lora.
"""

from reconstruct.methods.attach import MethodHandle, attach_method
from reconstruct.methods.loss import LOSSES
from reconstruct.methods.merge import MergeReport
from reconstruct.methods.spec import METHOD_NAMES, ReconSpec
from reconstruct.methods.evaluate import evaluate_error, evaluate_mse, sum_of_squares
from reconstruct.methods.samples import SampleSplit, split_samples
from reconstruct.methods.train import ReconResult, block_trainer, train_reconstruction

__all__ = [
    "LOSSES",
    "METHOD_NAMES",
    "MergeReport",
    "MethodHandle",
    "ReconResult",
    "ReconSpec",
    "SampleSplit",
    "attach_method",
    "block_trainer",
    "evaluate_error",
    "evaluate_mse",
    "split_samples",
    "sum_of_squares",
    "train_reconstruction",
]
