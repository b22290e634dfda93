"""``reconstruct inspect DIR``: sparsity per layer and per block of a model folder, and N:M compliance.

Works on any Hugging Face folder, pruned or dense. Tensors are read one at a time from the shards
(``CheckpointReader``: ``safe_open`` / memory-mapped ``.bin``) and the shards are unmapped after
every block, so memory holds one tensor at a time. The block list and the prunable layers come from
the same generic discovery the engine uses (skeleton on ``meta``); GPT-2 ``Conv1D`` weights are
stored (in, out) and are read as (out, in). A folder whose architecture transformers cannot build
falls back to tensor names: 2-D ``*.weight`` tensors under a numbered block, read as (out, in).

N:M compliance (``--nm 2:4``): every group of M consecutive weights along the input dimension of a
layer holds at most N non-zeros.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from reconstruct.modelio.checkpoint import CheckpointReader
from reconstruct.modelio.output import WEIGHT_SUFFIXES
from reconstruct.modelio.safetensors_header import DamagedFileError
from reconstruct.modelio.architecture import is_prunable_linear
from reconstruct.modelio.loaded import load_model
from reconstruct.shrink.roles import block_group_counts, find_roles

logger = logging.getLogger(__name__)

ROW_CHUNK = 4096  # output rows counted at once: bounds the temporaries of a large layer
BLOCK_INDEX = re.compile(r"\.(\d+)\.")
NOT_LINEAR_WORDS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")


@dataclass
class LayerSparsity:
    """Zeros of one prunable layer's weight."""

    block: int
    name: str  # relative to the block, e.g. "self_attn.q_proj"
    key: str  # checkpoint tensor name
    shape: tuple[int, int]  # (out, in)
    numel: int
    zeros: int
    nm_compliant: bool | None = None  # None: no --nm asked, or the input size is not a multiple of M
    nm_violations: int | None = None  # groups of M with more than N non-zeros

    @property
    def sparsity(self) -> float:
        """Share of zero weights."""
        return self.zeros / self.numel if self.numel else 0.0


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """``"2:4"`` → ``(2, 4)``; None stays None."""
    if nm is None:
        return None
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", nm)
    if not match or not 1 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--nm must be N:M with 1 <= N < M, such as 2:4; got {nm!r}")
    return int(match.group(1)), int(match.group(2))


@torch.no_grad()
def count_layer(weight_out_in: torch.Tensor, nm: tuple[int, int] | None) -> tuple[int, bool | None, int | None]:
    """Zeros of an (out, in) weight, and (with ``nm``) whether every group of M along the input has <= N non-zeros.

    Returns:
        ``(zeros, nm_compliant, nm_violations)``; the last two are None without ``nm`` or when the
        input size is not a multiple of M.
    """
    rows, columns = weight_out_in.shape
    zeros, violations = 0, 0
    check = nm is not None and columns % nm[1] == 0
    for start in range(0, rows, ROW_CHUNK):
        chunk = weight_out_in[start : start + ROW_CHUNK]  # (r, in)
        nonzero = chunk != 0
        zeros += int(nonzero.numel() - nonzero.sum())
        if check:
            n, m = nm
            per_group = nonzero.reshape(nonzero.shape[0], columns // m, m).sum(dim=-1)  # (r, in/M)
            violations += int((per_group > n).sum())
    if not check:
        return zeros, None, None
    return zeros, violations == 0, violations


def _layers_from_config(folder: Path):
    """``(architecture, [(block, name, key, stored_as_in_out)], outside keys, reader)`` via the engine's discovery."""
    from transformers.pytorch_utils import Conv1D


    loaded = load_model(str(folder), "cpu", "float32")
    entries = []
    for index, block in enumerate(loaded.blocks):
        prefix = loaded.layout.block_prefix(index)
        for name, module in block.named_modules():
            if is_prunable_linear(module):
                key = loaded.key_map.get(f"{prefix}{name}.weight")
                if key is not None:
                    entries.append((index, name, key, isinstance(module, Conv1D)))
    block_keys = {key for _, _, key, _ in entries}
    block_prefix = loaded.layout.blocks_path + "."
    inside = {loaded.key_map[k] for k in loaded.key_map if k.startswith(block_prefix)}
    outside = [key for key in loaded.reader.keys() if key not in inside and key not in block_keys]
    architecture = f"{type(loaded.model).__name__}, {loaded.layout.n_blocks} blocks"
    return architecture, entries, outside, loaded.reader


def _layers_from_names(folder: Path):
    """Fallback: 2-D ``*.weight`` tensors under a numbered block, read as (out, in)."""
    reader = CheckpointReader(folder)
    entries, outside = [], []
    for key in reader.keys():
        match = BLOCK_INDEX.search(key)
        lowered = key.lower()
        if match and key.endswith(".weight") and not any(word in lowered for word in NOT_LINEAR_WORDS) \
                and reader.read(key).dim() == 2:
            name = key[match.end():].removesuffix(".weight")
            entries.append((int(match.group(1)), name, key, False))
        else:
            outside.append(key)
    reader.close()
    entries.sort(key=lambda entry: (entry[0], entry[2]))
    return "layout guessed from tensor names", entries, outside, reader


def inspect_folder(folder: Path, nm: str | None = None) -> dict:
    """Sparsity of every prunable layer, per block and in total; N:M compliance when ``nm`` is given.

    Args:
        folder: a Hugging Face model folder (safetensors or ``.bin`` shards).
        nm: ``"N:M"`` to check, e.g. ``"2:4"``.

    Returns:
        ``{"folder", "architecture", "nm", "layers": [...], "blocks": [...], "total": {...},
        "outside_blocks": {...}}`` (see ``format_table`` for the readable form).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"inspect: {folder} is not a folder")
    pair = parse_nm(nm)
    architecture, entries, outside, reader = _find_layers(folder)
    layers = _count_layers(entries, reader, pair)
    outside_numel = outside_zeros = 0
    for key in outside:
        tensor = reader.read(key)
        if tensor.is_floating_point():
            outside_numel += tensor.numel()
            outside_zeros += int((tensor == 0).sum())
    reader.close()
    groups = _group_counts(folder)
    blocks = _summaries(layers, pair)
    for block in blocks:
        if groups is not None and block["index"] < len(groups):
            block["groups"] = groups[block["index"]]
    return {
        "folder": str(folder),
        "parameters": _parameters(folder),
        "file_bytes": sum(path.stat().st_size for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES),
        "architecture": architecture,
        "nm": nm,
        "layers": [{**asdict(layer), "sparsity": layer.sparsity} for layer in layers],
        "blocks": blocks,
        "total": _summary(layers, pair),
        "outside_blocks": {
            "tensors": len(outside), "numel": outside_numel, "zeros": outside_zeros,
            "sparsity": outside_zeros / outside_numel if outside_numel else 0.0,
        },
    }


def _find_layers(folder: Path):
    """``(architecture, entries, outside, reader)`` from ``config.json``, else from the tensor names."""
    try:
        found = _layers_from_config(folder)
    except DamagedFileError:
        raise  # a damaged file: reading the tensor names would fail on it too
    except ValueError as error:
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            raise ValueError(f"inspect: {folder} holds no *.safetensors or pytorch_model*.bin checkpoint") from None
        logger.warning("%s; reading the layers from the tensor names instead", error)
        found = _layers_from_names(folder)
    if not found[1]:
        raise ValueError(f"inspect: found no prunable layers in {folder}")
    return found


def _count_layers(entries, reader, pair) -> list[LayerSparsity]:
    """Zeros (and N:M compliance) of every prunable layer, reading one block's shard pages at a time."""
    layers: list[LayerSparsity] = []
    current_block = None
    for block, name, key, stored_in_out in entries:
        if block != current_block:
            reader.close()  # unmap the previous block's shard pages
            current_block = block
        weight = reader.read(key)
        weight = weight.t() if stored_in_out else weight  # (out, in)
        zeros, compliant, violations = count_layer(weight, pair)
        layers.append(LayerSparsity(block, name, key, tuple(weight.shape), weight.numel(), zeros, compliant, violations))
        del weight
    return layers


def _parameters(folder: Path) -> int:
    """Elements of every tensor stored in the folder's checkpoint (read one at a time)."""
    reader = CheckpointReader(folder)
    try:
        return sum(reader.read(key).numel() for key in reader.keys())
    finally:
        reader.close()


def _group_counts(folder: Path) -> list[dict[str, int]] | None:
    """Heads, key/value heads and MLP channels per block (``reconstruct.shrink``); None where not found."""

    try:
        loaded = load_model(str(folder), "cpu", "float32")
        return block_group_counts(loaded, find_roles(loaded))
    except (ValueError, RuntimeError, KeyError) as error:
        logger.info("no per-block head/channel counts: %s", error)
        return None


def _summary(layers: list[LayerSparsity], pair) -> dict:
    numel = sum(layer.numel for layer in layers)
    zeros = sum(layer.zeros for layer in layers)
    summary = {"layers": len(layers), "numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}
    if pair is not None:
        summary["nm_compliant_layers"] = sum(1 for layer in layers if layer.nm_compliant)
        summary["nm_compliant"] = all(layer.nm_compliant for layer in layers)
    return summary


def _summaries(layers: list[LayerSparsity], pair) -> list[dict]:
    blocks: dict[int, list[LayerSparsity]] = {}
    for layer in layers:
        blocks.setdefault(layer.block, []).append(layer)
    return [{"index": index, **_summary(members, pair)} for index, members in sorted(blocks.items())]


def _group_lines(blocks: list[dict]) -> list[str]:
    """``heads 2, key/value heads 2, channels 96`` for all blocks (one line when every block is the same)."""
    labels = {"heads": "heads", "kv_heads": "key/value heads", "channels": "channels"}

    def text(groups: dict) -> str:
        return ", ".join(f"{labels[kind]} {count}" for kind, count in groups.items())

    groups = [block.get("groups") for block in blocks]
    if not groups or any(not g for g in groups):
        return []
    if all(g == groups[0] for g in groups):
        return [f"groups per block (all {len(groups)} blocks): {text(groups[0])}"]
    return ["groups per block:"] + [f"  block {block['index'] + 1}: {text(block['groups'])}" for block in blocks]


def format_table(result: dict, per_layer: bool = False) -> str:
    """The readable form of ``inspect_folder``'s result: one row per block and overall (blocks numbered from 1).

    Args:
        result: what ``inspect_folder`` returned.
        per_layer: also one row per layer above each block's total (``reconstruct inspect --layers``).
    """
    nm = result["nm"]
    layers, blocks = result["layers"], {block["index"]: block for block in result["blocks"]}
    name_width = max([len(layer["name"]) for layer in layers] + [len("layer")])

    def verdict(ok) -> str:
        return "n/a" if ok is None else ("yes" if ok else "NO")

    header = f"{'block':>5}  {'layer':<{name_width}}  {'shape (out×in)':>15}  {'zeros / weights':>23}  {'sparsity':>8}"
    header += f"  {nm}" if nm else ""
    lines = [f"{result['folder']}: {result['architecture']}", "", header, "-" * len(header)]

    def row(block: str, name: str, shape: str, zeros: int, numel: int, sparsity: float, ok: str | None) -> str:
        text = f"{block:>5}  {name:<{name_width}}  {shape:>15}  {f'{zeros:,} / {numel:,}':>23}  {sparsity:>8.4f}"
        return text + (f"  {ok}" if nm else "")

    for position, layer in enumerate(layers):
        shape = "×".join(str(size) for size in layer["shape"])
        ok = None
        if nm:
            ok = verdict(layer["nm_compliant"])
            if layer["nm_violations"]:
                ok += f" ({layer['nm_violations']:,} groups)"
        number = str(layer["block"] + 1)
        if per_layer:
            lines.append(row(number, layer["name"], shape, layer["zeros"], layer["numel"], layer["sparsity"], ok))
        last_of_block = position + 1 == len(layers) or layers[position + 1]["block"] != layer["block"]
        if last_of_block:
            block = blocks[layer["block"]]
            ok = verdict(block.get("nm_compliant")) if nm else None
            lines.append(row(number, "(block)", "", block["zeros"], block["numel"], block["sparsity"], ok))
            if per_layer:
                lines.append("")
    total = result["total"]
    ok = f"{total['nm_compliant_layers']}/{total['layers']}" if nm else None
    lines.append(row("all", f"({total['layers']} layers)", "", total["zeros"], total["numel"], total["sparsity"], ok))
    lines.append(f"\nparameters: {result['parameters']:,}; weight files: {result['file_bytes'] / 2**20:.2f} MiB")
    lines.extend(_group_lines(result["blocks"]))
    outside = result["outside_blocks"]
    lines.append(f"\noutside the blocks (embeddings, norms, head; never pruned): {outside['tensors']} tensors, "
                 f"sparsity {outside['sparsity']:.4f}")
    if not per_layer:
        lines.append("(--layers: one row per layer)")
    if nm:
        lines.append(f"{nm} compliant: {'yes, every layer' if total['nm_compliant'] else 'no'} "
                     f"(at most {nm.split(':')[0]} non-zeros in every group of {nm.split(':')[1]} along the input)")
    return "\n".join(lines)
