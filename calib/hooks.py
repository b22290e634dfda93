"""Forward hooks that feed each linear's inputs to its pruner statistics."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


class StatisticsComplete(Exception):
    """Raised by a statistics hook once every watched linear has received this forward's input."""


@contextmanager
def feeding_statistics(linears: dict[str, nn.Module], stats: dict[str, object]):
    """While active, every call of ``linears[name]`` first feeds its input to ``stats[name].add_batch``.

    Yields ``cut_short(forward)``: a wrapper that stops a block forward as soon as every linear in
    ``stats`` has received its input. Nothing after that point can change the statistics, so the
    last linear's own matmul and whatever follows it (for LLaMA the ``down_proj`` matmul, a quarter
    of the block's linear FLOPs; with ``--sequential`` everything after the group) never run. A
    linear that a forward does not call (an unrouted expert) just means that forward runs to the end.
    Called directly (without the wrapper) the forward runs in full. Hooks are removed on exit, also
    when the forward raises.
    """
    handles = []
    seen: set[str] = set()
    cutting = False  # True only while a cut_short forward runs

    def cut_short(forward):
        def run(hidden):
            nonlocal cutting
            seen.clear()
            cutting = True
            try:
                return forward(hidden)
            except StatisticsComplete:
                return None
            finally:
                cutting = False

        return run

    try:
        for name, layer_stats in stats.items():

            def hook(module, args, name=name, layer_stats=layer_stats):
                layer_stats.add_batch(args[0].detach())  # (b, T, in)
                if cutting:
                    seen.add(name)
                    if len(seen) == len(stats):
                        raise StatisticsComplete

            handles.append(linears[name].register_forward_pre_hook(hook))
        yield cut_short
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording_linear_inputs(linears: dict[str, nn.Module], record: list[tuple[str, int, tuple]]):
    """While active, append ``(name, data_ptr, shape)`` of each linear's input in call order.

    The inputs are kept alive until the context exits: a freed input's memory could otherwise be
    reused for a later linear's input (o_proj's input and the MLP's normed input have the same shape
    when hidden == heads x head_dim), and equal pointers would merge two sub-layers into one group.
    """
    handles = []
    alive: list = []
    try:
        for name, module in linears.items():

            def hook(module, args, name=name):
                alive.append(args[0])
                record.append((name, args[0].data_ptr(), tuple(args[0].shape)))

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        alive.clear()


def group_by_shared_input(record: list[tuple[str, int, tuple]]) -> list[list[str]]:
    """Sub-layer groups in execution order: consecutive linears that read the same tensor.

    For LLaMA this yields [[q, k, v], [o], [gate, up], [down]]; for OPT [[q, k, v], [out], [fc1], [fc2]]:
    the sequential order SparseGPT uses, found without a per-model table.
    """
    groups: list[list[str]] = []
    previous_key = None
    seen: set[str] = set()
    for name, pointer, shape in record:
        if name in seen:
            continue
        seen.add(name)
        key = (pointer, shape)
        if groups and key == previous_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous_key = key
    return groups
