"""The retraining stage's memory: what the resident and the streamed path hold, and whether it fits.

An estimate from the checkpoint's headers and the config (nothing is loaded), in the style of
``reconstruct.planner``: items in bytes on the compute device, the refusal naming the flag to change.

- resident: every weight, the trainables with gradient and two AdamW moments (float32, 16 bytes each),
  one micro-batch's activations of every block (autograd keeps them) and its float32 logits; with a
  low-rank method, every linear's effective weight ``W + delta`` (kept from one step to the next);
- streamed: the largest block and the modules outside the blocks, the same trainable state, one
  micro-batch's activations of one block, the logits, and the block-boundary hidden states of the
  step's windows (n_blocks + 2 streams of (batch, T, H): inputs, last output, gradient), which live in
  the device tier only when they fit (else host memory or disk, as the calibration streams, and they
  are not counted here); a low-rank method's effective weights of one block; on the CPU, the next
  block read ahead (on a GPU it waits in pinned host memory). On the CPU the rest is host memory;
  boundary states on disk are not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from reconstruct.config import JobConfig
from reconstruct.evaluation.streaming import available_bytes, model_bytes, should_stream
from reconstruct.flags import flag_name
from reconstruct.modelio.loaded import LoadedModel
from reconstruct.planner.budget import human
from reconstruct.planner.tier import choose_stream_tier, streams_fit_free_memory
from reconstruct.methods.spec import LOW_RANK_METHODS
from reconstruct.retrain.spec import RetrainSpec, stage_flag_name
from reconstruct.retrain.trainables import estimate_trainable_count

logger = logging.getLogger(__name__)

ACTIVATION_FACTOR = 24  # saved (b, T, H)-sized tensors per block forward under autograd (norms, q/k/v, MLP)
FIT_SHARE = 0.9  # a plan fits when it needs at most this share of the available memory


@dataclass
class RetrainMemory:
    """Bytes on the compute device for one path."""

    streamed: bool
    items: dict[str, int]
    available: int

    @property
    def total(self) -> int:
        """All items together."""
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        """Whether the total is within ``FIT_SHARE`` of the available memory."""
        return self.total <= FIT_SHARE * self.available

    def format(self) -> str:
        """One line per item and the total against what is available."""
        path = "streamed" if self.streamed else "resident"
        lines = [f"retraining memory ({path}): {human(self.total)} of {human(self.available)} available"]
        lines += [f"  {name}: {human(value)}" for name, value in self.items.items()]
        return "\n".join(lines)


def boundary_tier(spec: RetrainSpec, loaded: LoadedModel) -> str:
    """Where a streamed step keeps its boundary hidden states: the calibration streams' rule (``planner.tier``).

    A step holds ``n_blocks + 2`` streams of (batch, T, H): every block's input, the last output and the
    gradient; the fastest tier they fit in a share of free memory (device, cpu, then disk).
    """
    itemsize = torch.finfo(loaded.dtype).bits // 8
    stream_bytes = (loaded.layout.n_blocks + 2) * spec.batch * spec.seq_len * loaded.hidden_size * itemsize
    return choose_stream_tier("auto", loaded.device.type, streams_fit_free_memory(stream_bytes, loaded.device))


def linear_bytes(loaded: LoadedModel) -> int:
    """Bytes of one block's prunable linear weights in the compute dtype (from the skeleton's shapes)."""
    block = loaded.blocks[0]
    itemsize = torch.finfo(loaded.dtype).bits // 8
    return sum(block.get_submodule(name).weight.numel() for name in loaded.layout.linear_names) * itemsize


def estimate(spec: RetrainSpec, loaded: LoadedModel, streamed: bool) -> RetrainMemory:
    """The device bytes of retraining ``loaded`` under ``spec`` on one path."""
    config, itemsize = loaded.config, torch.finfo(loaded.dtype).bits // 8
    n_blocks, hidden = loaded.layout.n_blocks, loaded.hidden_size
    weights = model_bytes(loaded.folder, loaded.dtype)
    block = sum(param.numel() for param in loaded.blocks[0].parameters()) * itemsize
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    micro_tokens = spec.micro_batch * spec.seq_len
    block_activations = (ACTIVATION_FACTOR * micro_tokens * hidden + 2 * spec.micro_batch * heads * spec.seq_len ** 2) * itemsize
    logits = 3 * micro_tokens * int(config.vocab_size) * 4  # float32 logits, their softmax and gradient
    items = {"trainables + gradients + AdamW moments (float32)": 16 * estimate_trainable_count(spec, loaded.layout,
                                                                                               loaded.blocks)}
    low_rank = spec.method in LOW_RANK_METHODS
    if streamed:
        items["one block + embeddings, final norm, head"] = block + (weights - n_blocks * block)
        if loaded.device.type == "cpu":
            items["the next block, read ahead"] = block
        if low_rank:
            items["one block's effective weights (W + delta)"] = linear_bytes(loaded)
        items["one block's activations (autograd)"] = block_activations
        tier = boundary_tier(spec, loaded)  # counted where they live: the device tier, or host memory on the CPU
        if tier == "device" or (tier == "cpu" and loaded.device.type != "cuda"):  # else host memory / disk
            items["block-boundary hidden states of a step"] = (n_blocks + 2) * spec.batch * spec.seq_len * hidden * itemsize
    else:
        items["all weights"] = weights
        if low_rank:
            items["effective weights of every linear (W + delta)"] = n_blocks * linear_bytes(loaded)
        items["activations of every block (autograd)"] = n_blocks * block_activations
    items["logits of a micro-batch"] = logits
    if spec.distils:  # the KL's float32 log-softmax at T and its gradient; the teacher's top-k stay in host memory
        items["distillation: the student's log-probabilities at T"] = 2 * micro_tokens * int(config.vocab_size) * 4
    return RetrainMemory(streamed, items, available_bytes(loaded.device))


# What shrinks a step, named by reconstruct retrain's flags, and by run --retrain-steps's (the micro-batch is
# run's own --batch-size there; the others the stage's --retrain-* flags).
STEP_SIZE_FIELDS = ("micro_batch", "batch", "seq_len")
RETRAIN_FLAGS = tuple(flag_name(RetrainSpec, field) for field in STEP_SIZE_FIELDS)
RUN_FLAGS = (flag_name(JobConfig, "micro_batch"),
             *(stage_flag_name(flag_name(RetrainSpec, field)) for field in STEP_SIZE_FIELDS[1:]))


def check_fits(spec: RetrainSpec, loaded: LoadedModel, streamed: bool,
               flags: tuple[str, str, str] = RETRAIN_FLAGS) -> RetrainMemory:
    """Log the plan of the chosen path; refuse one that cannot fit, naming the flag to change.

    Args:
        spec: the retraining job.
        loaded: the model.
        streamed: the path.
        flags: the micro-batch, batch and window-length flags of the command, for the refusal.

    Raises:
        ValueError: the resident path does not fit (use ``--stream always``), or the streamed one does
            not (lower the micro-batch, the batch or the window length).
    """
    plan = estimate(spec, loaded, streamed)
    logger.info("%s", plan.format())
    if plan.fits:
        return plan
    if not streamed:
        raise ValueError(f"retraining resident needs about {human(plan.total)}, {human(plan.available)} available; "
                         "use --stream always (or auto) to hold one block at a time")
    raise ValueError(f"retraining streamed needs about {human(plan.total)}, {human(plan.available)} available; "
                     f"lower {flags[0]}, {flags[1]} or {flags[2]}")


def stage_plan(spec: RetrainSpec, loaded: LoadedModel, title: str = "retraining stage") -> tuple[str, bool]:
    """Both paths' plans for ``reconstruct plan``, naming the one the stage would take; whether that one fits.

    The path is the stage's own choice (``choose_stream`` below: ``--stream``, else stream when the
    weights or the resident plan do not fit). ``title`` names the stage (the retraining stage, or
    model-level LoRAPrune's training, which runs on the same trainer).
    """

    streamed = choose_stream(spec, loaded)
    plans = {path: estimate(spec, loaded, path) for path in (False, True)}
    chosen = plans[streamed]
    verdict = "fits" if chosen.fits else "does not fit"
    lines = [f"{title} ({spec.steps} steps, {spec.batch} x {spec.seq_len} tokens a step): "
             f"{'streamed' if streamed else 'resident'}, {verdict}"]
    lines += [plans[path].format() for path in (False, True)]
    return "\n".join(lines), chosen.fits


def choose_stream(spec: RetrainSpec, loaded: LoadedModel) -> bool:
    """Whether to stream: ``--stream always|never``, or ``auto``: when the weights do not fit the device
    comfortably or the resident path's memory plan (``memory.estimate``) does not fit."""
    if spec.stream != "auto":
        return spec.stream == "always"
    return should_stream(loaded.folder, loaded.device, loaded.dtype) or not estimate(spec, loaded, False).fits
