"""The memory planner: what one job needs on the device and on the host, predicted before any work.

``reconstruct plan`` prints it and ``reconstruct run`` logs it and refuses to start when it does not
fit. The plan follows what the engine actually does, phase by phase (calibration, block-0 capture,
then per block: load, dense pass, statistics, prune, reconstruction, merge, sparse pass, write,
stream checkpoint; finally the assembly of the output), and reports the largest phase on each side.

Where the numbers come from:

- Tensors the engine allocates with known shapes (one block's weights, the two activation streams,
  keep masks, pruner statistics, adapters and AdamW state, the pruner's temporaries) are counted
  from the model's config: exact for the tensors, formulas for the pruners' temporaries.
- Activations of the forward passes and of one reconstruction micro-batch (forward, loss, backward,
  with the method's adapters attached) are *traced*: one block is built on the ``meta`` device at
  the real shapes and dtype, the engine's own forward and loss run on it, and a dispatch mode adds
  up the bytes of every storage alive at each op (what autograd saves for backward included). Meta
  runs attention through PyTorch's math path, so ``scaled_dot_product_attention`` is routed to the
  CPU flash-attention op, whose saved tensors (output, log-sum-exp) match the fused kernels that
  CPUs and GPUs use; an explicit eager attention is traced as it is.
- Constants nobody can trace from here (the interpreter with torch imported, the CUDA context, the
  caching allocator's slack, tokenizer memory per character) are named below with their source.

Everything in the device column goes to the host when the device is the CPU.
"""

from reconstruct.planner.budget import GIB, KIB, MIB, MemoryBudget, human, parse_bytes
from reconstruct.planner.entry import check_memory_plan, plan_from_config, plan_job, planned_device
from reconstruct.planner.sizes import prune_temporary_bytes, statistics_bytes, stream_bytes
from reconstruct.planner.plan import Item, MemoryPlan, Phase, log_plan
from reconstruct.planner.probe import ModelProbe, probe_model
from reconstruct.planner.tier import auto_tiers, choose_stream_tier, streams_fit_free_memory
from reconstruct.planner.tracing import trace_block, trace_peak

__all__ = [
    "GIB", "KIB", "MIB", "Item", "MemoryBudget", "MemoryPlan", "ModelProbe", "Phase", "check_memory_plan", "human",
    "log_plan", "parse_bytes", "plan_from_config", "plan_job", "planned_device", "probe_model",
    "prune_temporary_bytes", "statistics_bytes", "stream_bytes", "trace_block", "trace_peak", "auto_tiers",
    "choose_stream_tier", "streams_fit_free_memory",
]
