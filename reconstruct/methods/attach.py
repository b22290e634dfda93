"""Attaching a reconstruction method to one pruned block, and merging it back.

``attach_method`` turns the block into a trainable one (adapter wrappers or float32 masters), hands
back a ``MethodHandle`` that lists the trainable parameters, and ``MethodHandle.merge`` folds
everything back so the block has its original module types, parameter names and sparsity again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pruners.layers import weight_as_out_in
from pruners.lowrank import LowRankLinear, layer_seed, swap_module
from pruners.lowrank_function import Workspace
from reconstruct.methods.bias_norm import MasterParam, bias_masters, norm_masters
from reconstruct.methods.merge import (
    MergeReport,
    check_merge,
    count_pruned_nonzero,
    dense_merge_allowed,
    log_densification,
    verify_sparsity,
)
from reconstruct.methods.spec import LOW_RANK_METHODS, METHOD_NAMES, SPARSITY_PRESERVING


class MethodHandle:
    """The trainable state of one block under one method. Create it with ``attach_method``.

    Attributes:
        method: the method name.
        added_biases: linears that got a new (zero-initialised) bias; the engine turns the matching
            config flag on (e.g. ``attention_bias``/``mlp_bias``) when it writes the model.
    """

    def __init__(
        self,
        method: str,
        block: nn.Module,
        linears: dict[str, nn.Module],
        keep_masks: dict[str, Tensor],
        wrappers: dict[str, LowRankLinear],
        masters: dict[str, MasterParam],
    ) -> None:
        self.method = method
        self.block = block
        self.linears = dict(linears)
        self.keep_masks = keep_masks
        self.wrappers = wrappers
        self.masters = masters
        self.added_biases: set[str] = {name[: -len(".bias")] for name, m in masters.items() if m.is_new}
        self._open = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise, in a fixed order (float32)."""
        params: list[nn.Parameter] = []
        for wrapper in self.wrappers.values():
            params += [wrapper.lora_A, wrapper.lora_B]
        params += [master.master for master in self.masters.values()]
        return params

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.trainable_parameters())

    def merge(self, allow_dense_merge: bool = False) -> MergeReport:
        """Fold the trained parameters into plain weights and remove every wrapper and hook.

        Nothing is written unless every merged tensor is finite. Sparsity-preserving methods re-apply
        the keep mask and then the merge checks that every pruned weight is still exactly zero.

        Args:
            allow_dense_merge: lora only: accept that the merge fills pruned positions.

        Returns:
            A MergeReport; for lora, ``densified_fraction`` is the share of pruned weights now non-zero.

        Raises:
            ValueError: lora without ``allow_dense_merge`` (nothing changed; the handle stays open).
            RuntimeError: a merged tensor is not finite (nothing changed; call ``discard`` to drop the
                adapters), or a pruned weight came back (an internal error).
        """
        self._require_open()
        dense_merge_allowed(self.method, allow_dense_merge)
        check_merge(self.wrappers, self.masters)

        report = MergeReport(method=self.method, added_biases=sorted(self.added_biases))
        with torch.no_grad():
            for name, wrapper in self.wrappers.items():
                wrapper.commit(wrapper.merged_weight())
                self._unwrap(name, wrapper)
                report.merged_tensors.append(f"{name}.weight")
            for name, master in self.masters.items():
                master.restore(master.value())
                report.merged_tensors.append(name)
        self._open = False

        for name, linear in self.linears.items():
            pruned, nonzero = count_pruned_nonzero(linear, self.keep_masks[name])
            report.pruned_positions += pruned
            report.densified_positions += nonzero
        if report.pruned_positions:
            report.densified_fraction = report.densified_positions / report.pruned_positions
        if self.method in SPARSITY_PRESERVING:
            verify_sparsity(self.linears, self.keep_masks)
        else:
            log_densification(report)
        return report

    def discard(self) -> None:
        """Drop the method: the block gets back exactly the modules and tensors it had before attach."""
        self._require_open()
        for name, wrapper in self.wrappers.items():
            self._unwrap(name, wrapper)
        for master in self.masters.values():
            master.restore(None)
        self._open = False

    def _unwrap(self, name: str, wrapper: LowRankLinear) -> None:
        wrapper.forget_weight()  # the cached effective weight goes with the wrapper
        parent_name, _, attr = name.rpartition(".")
        setattr(self.block.get_submodule(parent_name), attr, wrapper.base)

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"the {self.method} method was already merged or discarded for this block")


def check_keep_masks(linears: dict[str, nn.Module], keep_masks: Mapping[str, Tensor], *, contents: bool = True) -> None:
    """Every linear has a keep mask; with ``contents``, of its (out, in) shape, and every pruned weight is 0.

    Raises:
        ValueError: naming the first layer that fails.
    """
    for name, linear in linears.items():
        if name not in keep_masks:
            raise ValueError(f"no keep mask for layer {name!r}")
        if not contents:
            continue
        weight = weight_as_out_in(linear)
        if tuple(keep_masks[name].shape) != tuple(weight.shape):
            raise ValueError(
                f"keep mask of {name!r} has shape {tuple(keep_masks[name].shape)}, "
                f"the (out, in) weight has {tuple(weight.shape)}"
            )
        _, nonzero = count_pruned_nonzero(linear, keep_masks[name])
        if nonzero:
            raise ValueError(f"{name!r}: {nonzero} weight(s) outside the keep mask are non-zero; prune first")


def _check_arguments(method: str, linears: dict[str, nn.Module], keep_masks: Mapping[str, Tensor],
                     bias_linears: set[str], zero_pattern_masks: bool) -> None:
    """``attach_method``'s refusals: an unknown method, unknown bias linears, keep masks that do not fit."""
    if method not in METHOD_NAMES:
        raise ValueError(f"--method must be one of {', '.join(METHOD_NAMES)}; got {method!r}")
    unknown = set(bias_linears) - set(linears)
    if unknown:
        raise ValueError(f"bias_linears names layers that are not among the block's linears: {sorted(unknown)}")
    check_keep_masks(linears, keep_masks, contents=not zero_pattern_masks)


def attach_method(
    method: str,
    block: nn.Module,
    linears: dict[str, nn.Module],
    keep_masks: Mapping[str, Tensor],
    *,
    rank: int,
    alpha: float,
    bias_linears: set[str],
    dtype_for_params: torch.dtype = torch.float32,
    seed: int = 0,
    workspace: Workspace | None = None,
    zero_pattern_masks: bool = False,
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]] | None = None,
) -> MethodHandle:
    """Make a pruned block trainable under one reconstruction method.

    Args:
        method: one of METHOD_NAMES.
        block: the transformer block, on the compute device, every parameter frozen.
        linears: qualified name (relative to the block) -> ``nn.Linear`` or ``Conv1D``.
        keep_masks: name -> bool (out, in) mask, True = weight survives; every pruned weight must be 0.
        rank: adapter rank (low-rank methods).
        alpha: adapter scaling numerator, delta scaled by alpha / rank (low-rank methods).
        bias_linears: linears that may carry a bias in the written model; "bias"/"bias-ln" give those
            lacking one a zero-initialised bias. Existing biases are always trained by these methods.
        dtype_for_params: dtype of everything trained (adapters, masters): float32.
        seed: seed for the adapter init (combined with each layer's name). Pass the job's per-block
            seed; the same seed gives the same init on any device.
        workspace: the adapters' scratch tensors (``pruners.lowrank_function.Workspace``), shared with
            other blocks' adapters that never run at the same time; default: one for this block.
        zero_pattern_masks: the keep masks are ``weight != 0`` (model-level retraining builds them so at
            every load): their shape and zeros hold by construction and are not checked, so a mapping
            that computes each mask when it is first read computes only those the method uses.
        factors: linear → its adapter's ``(A, B)`` from an earlier attach, used as they are (low-rank
            methods; model-level retraining keeps them between loads of a block).

    Returns:
        The MethodHandle: ``trainable_parameters()``, ``merge()``, ``discard()``, ``added_biases``.

    Raises:
        ValueError: unknown method, a keep mask missing or of the wrong shape, a pruned weight that is
            not zero, or a name in bias_linears that is not in linears.
    """
    _check_arguments(method, linears, keep_masks, bias_linears, zero_pattern_masks)
    wrappers: dict[str, LowRankLinear] = {}
    masters: dict[str, MasterParam] = {}
    if method in LOW_RANK_METHODS:
        workspace = workspace if workspace is not None else Workspace()
        for name, linear in linears.items():
            wrappers[name] = LowRankLinear(
                linear, keep_masks[name], kind=method, rank=rank, alpha=alpha, seed=layer_seed(seed, name),
                param_dtype=dtype_for_params, workspace=workspace, factors=None if factors is None else factors[name],
            )
            swap_module(block, name, linear, wrappers[name])
    if method in ("bias", "bias-ln"):
        masters.update(bias_masters(linears, set(bias_linears), dtype_for_params))
    if method in ("ln", "bias-ln"):
        masters.update(norm_masters(block, dtype_for_params))
    return MethodHandle(method, block, linears, keep_masks, wrappers, masters)
