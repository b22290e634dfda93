"""The runners ``bench/retrain_speed.py`` times: one optimizer step of model-level retraining each.

Every runner has ``step(index, tokens) -> mean token loss`` and ``close()``. ``Ours`` is the trainer
``reconstruct retrain`` runs (``Trainer`` over a ``ResidentModel`` or ``StreamedModel``); ``Plain`` is a
transformers model trained the ordinary way (forward with ``labels``, backward, clipping at 1 as the
Hugging Face Trainer does, ``torch.optim.AdamW`` with its defaults) with chosen parameters trainable;
``PeftLora`` is the same loop over peft's LoRA. All cut a step into the same micro-batches and scale
each micro-batch's loss by its share of the step's scored tokens, as ours does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from reconstruct.modelio.block_reads import BlockReads
from reconstruct.modelio.loaded import load_model
from reconstruct.modelio.source import resolve_model
from reconstruct.retrain.engine import Trainer, open_model
from reconstruct.retrain.hooks import NoHooks
from reconstruct.retrain.loss import scored_tokens
from reconstruct.retrain.session import BlockLoader
from reconstruct.retrain.spec import RetrainSpec
from reconstruct.retrain.trainables import ModelTrainables

LR = 5e-4  # PERP's peak learning rate; every runner uses it without a schedule's warm-up
MANY_STEPS = 1_000  # the schedule's length for ours: the first steps then run near the peak of the warm-up


def pruned_model(model: str, work: Path, sparsity: float) -> Path:
    """A copy of ``model`` with every block linear pruned by magnitude per output row (cached in ``work``).

    Which weights are zero does not change a step's arithmetic, only that they are zero: magnitude
    needs no calibration pass, so the copy takes seconds.
    """
    source = resolve_model(model)
    target = work / f"{source.name}-magnitude{sparsity:g}"
    if (target / "config.json").exists():
        return target
    loaded = load_model(str(source), "cpu", "float32")
    block_keys = {loaded.key_map[f"{loaded.layout.block_prefix(index)}{name}.weight"]
                  for index in range(loaded.layout.n_blocks) for name in loaded.layout.linear_names}
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy2(path, partial / path.name)
            continue
        tensors = load_file(str(path))
        for key in block_keys & tensors.keys():
            weight = tensors[key]  # (out, in) for nn.Linear
            cut = int(weight.shape[1] * sparsity)
            order = weight.abs().argsort(dim=1)[:, :cut]  # each row's smallest magnitudes
            tensors[key] = weight.scatter(1, order, 0.0)
        save_file(tensors, str(partial / path.name), metadata={"format": "pt"})
    partial.rename(target)
    return target


class Ours:
    """``reconstruct retrain``'s step: ``Trainer.step`` over the resident or streamed model."""

    def __init__(self, folder: Path, method: str, *, stream: bool, args, scratch: Path) -> None:
        self.loaded = load_model(str(folder), args.device, args.dtype)
        self.spec = RetrainSpec(method=method, steps=MANY_STEPS, batch=args.batch, micro_batch=args.micro_batch,
                                seq_len=args.seq_len, rank=args.rank, alpha=2.0 * args.rank, lr=LR, warmup=0.0,
                                stream="always" if stream else "never")
        self.trainables = ModelTrainables(self.spec, self.loaded.layout)
        self.reads = BlockReads(self.loaded, background=True)  # as retrain_model: each block read ahead
        self.loader = BlockLoader(self.loaded, self.trainables, NoHooks(), reads=self.reads)
        scratch.mkdir(parents=True, exist_ok=True)
        self.model = open_model(self.loader, self.spec, stream, scratch)
        self.trainer = Trainer(self.model, self.trainables, self.spec, NoHooks())

    def step(self, index: int, tokens: torch.Tensor) -> float:
        return self.trainer.step(index, tokens, scored_tokens(tokens))

    def trainable_count(self) -> int:
        return self.trainables.numel()

    def close(self) -> None:
        self.model.close()
        self.reads.close()


def _transformers_model(folder: Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(device)
    model.eval()  # as ours: no dropout (SmolLM2 has none anyway)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class Plain:
    """A plain transformers step: ``trainable`` is ``norms`` (the blocks' norms) or ``blocks`` (every block tensor)."""

    def __init__(self, folder: Path, trainable: str, *, args) -> None:
        self.model = _transformers_model(folder, args.dtype, args.device)
        self.device = torch.device(args.device)
        self.micro_batch = args.micro_batch
        blocks = [(name, param) for name, param in self.model.named_parameters() if ".layers." in name]
        if trainable == "norms":
            blocks = [(name, param) for name, param in blocks if "norm" in name]
        self.params = [param.requires_grad_(True) for _, param in blocks]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)

    def step(self, index: int, tokens: torch.Tensor) -> float:
        total, loss_sum = scored_tokens(tokens), 0.0
        for start in range(0, tokens.shape[0], self.micro_batch):
            batch = tokens[start : start + self.micro_batch].to(self.device)
            loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss  # mean over the scored tokens
            share = scored_tokens(batch) / total
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def trainable_count(self) -> int:
        return sum(param.numel() for param in self.params)

    def close(self) -> None:
        self.model = None


class PeftLora(Plain):
    """peft's LoRA (rank ``args.rank``, alpha 2 × rank, no dropout) on every block linear, the plain step."""

    def __init__(self, folder: Path, *, args) -> None:
        from peft import LoraConfig, get_peft_model

        self.device = torch.device(args.device)
        self.micro_batch = args.micro_batch
        base = _transformers_model(folder, args.dtype, args.device)
        loaded = load_model(str(folder), "cpu", args.dtype)
        targets = sorted({name.rpartition(".")[2] for name in loaded.layout.linear_names})
        config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets)
        self.model = get_peft_model(base, config)
        self.params = [param for param in self.model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True
