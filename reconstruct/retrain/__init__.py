"""Model-level retraining (PERP's global step), streamed one block at a time or resident.

``retrain_model(loaded, spec, data, out, hooks=..., merge=...)`` trains the method's parameters of every
block at once on the causal-LM loss and writes a Hugging Face folder whose zeros are the input's. Callers
that build on the trainer pass a ``RetrainHooks`` object (``block_loaded``, ``block_gradients_ready``,
``step_done``; ``NoHooks`` has no-op defaults). See docs/architecture.md.
"""

from reconstruct.retrain.engine import RetrainResult, retrain_model
from reconstruct.retrain.hooks import NoHooks, RetrainHooks
from reconstruct.retrain.spec import RETRAIN_METHODS, RetrainSpec

__all__ = ["NoHooks", "RETRAIN_METHODS", "RetrainHooks", "RetrainResult", "RetrainSpec", "retrain_model"]
