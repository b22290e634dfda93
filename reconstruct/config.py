"""The job's settings as frozen dataclasses, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pruners.pattern import SparsityPattern


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration samples come from and how many."""

    source: str = "self"  # "self", a dataset name (wikitext2, c4, ptb) or a local .txt/.jsonl file
    n_samples: int = 128  # calibration sequences
    seq_len: int = 2048  # tokens per sequence
    seed: int = 0  # seeds window sampling, self-generation and reconstruction batches


@dataclass(frozen=True)
class PruneSpec:
    """Which pruner, which pattern, and its options."""

    pruner: str = "wanda"  # magnitude, wanda, sparsegpt
    pattern: SparsityPattern = field(default_factory=SparsityPattern)
    sequential: bool = False  # prune sub-layer groups one after another (q/k/v, o, up/gate, down)
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT damping, fraction of the mean Hessian diagonal


@dataclass(frozen=True)
class JobConfig:
    """Everything ``reconstruct run`` needs."""

    model: str  # folder, .gguf, hub id or alias
    out: Path  # output folder (also holds the resume state)
    prune: PruneSpec = field(default_factory=PruneSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    recon: object | None = None  # reconstruct.methods.ReconSpec; None = no reconstruction
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    micro_batch: int = 8  # samples per block forward
    offload: str = "auto"  # activation cache tier: auto, device, cpu, disk
    checkpoint_every: int = 1  # save the activation streams every k blocks
    force: bool = False  # start over even if --out holds another job
