"""The phases of a job's memory plan on one stream tier, and the notes that qualify them.

``TierSizes`` holds the numbers one tier's plan is made of (block, stream, statistics, masks,
trainable state, the traced activations); ``build_phases`` lists what each phase of the job holds,
in the order the job runs them (calibration, block-0 capture, block load, the optional allocation
and dense passes, statistics, pruning, reconstruction and merge, the sparse pass, the block write,
the stream checkpoint, the output assembly); ``closing_notes`` says what the plan leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconstruct.planner.budget import human
from reconstruct.planner.plan import Item, Phase
from reconstruct.planner.probe import in_out
from reconstruct.planner.sizes import (
    ADAMW_TEMPORARIES, CUDA_ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, CUDA_HOST_EXTRA_BYTES, GENERATE_BATCH,
    HOST_BASELINE_BYTES, TOKENIZE_BYTES_PER_CHAR, element_size, prune_temporary_bytes, statistics_bytes,
    stream_bytes, text_chars, unit_objective,
)


@dataclass
class TierSizes:
    """The byte counts of one tier's plan (``inputs``: the planner's ``PlanInputs``; ``probe``: its ``ModelProbe``)."""

    inputs: object
    probe: object
    tier: str
    trace: dict
    linears: dict[str, tuple[int, int]]  # name → (out, in)
    block: int  # one block's weights in the compute dtype
    block_stored: int  # ... in the checkpoint's dtype
    stream: int  # one activation stream
    masks: int  # keep masks of the block (bool)
    stats: int  # the largest group's pruner statistics
    largest: tuple[int, int]  # (out, in) of the largest linear
    prune_tmp: int  # pruner temporaries of the largest linear
    trainable: int  # bytes of the reconstruction's trainable parameters
    in_flight: list[Item] = field(default_factory=list)  # blocks in flight beside the computing one (overlap)

    @classmethod
    def measure(cls, inputs, probe, groups, tier: str, trace: dict) -> TierSizes:
        """The sizes of the job described by ``inputs`` on ``tier`` (``groups``: linears pruned together)."""
        e, es = element_size(inputs.dtype), element_size(inputs.stored_dtype)
        linears = {name: in_out(probe.block.get_submodule(name)) for name in probe.layout.linear_names}
        stats_by_group = [statistics_bytes(inputs.pruner, [linears[n][1] for n in group]) for group in groups]
        return cls(
            inputs=inputs, probe=probe, tier=tier, trace=trace, linears=linears,
            block=probe.block_numel * e + probe.block_other_bytes,
            block_stored=probe.block_numel * es + probe.block_other_bytes,
            stream=stream_bytes(inputs.n_samples, inputs.seq_len, probe.hidden, inputs.dtype),
            masks=sum(o * i for o, i in linears.values()),
            stats=max(stats_by_group, default=0),
            largest=max(linears.values(), key=lambda oi: oi[0] * oi[1]),
            prune_tmp=max(prune_temporary_bytes(inputs.pruner, o, i, inputs.dtype, inputs.pattern)
                          for o, i in linears.values()),
            trainable=trace.get("trainable_bytes", 0),
        )

    @property
    def cuda(self) -> bool:
        return self.inputs.device_type == "cuda"

    @property
    def dev(self) -> str:
        """Where compute tensors live: ``device`` on a GPU, else ``host``."""
        return "device" if self.cuda else "host"

    @property
    def recon_state(self) -> int:
        """Trainable parameters, their 2 AdamW moments and foreach temporaries."""
        return self.trainable * (3 + ADAMW_TEMPORARIES)

    def slack(self, n: int) -> int:
        """The caching allocator's fragmentation on top of ``n`` bytes (none on CPU)."""
        return int(CUDA_ALLOCATOR_SLACK * n) if self.cuda else 0

    def baseline(self) -> list[Item]:
        """The process itself: python, torch, transformers, and the CUDA context on a GPU."""
        items = [Item("python, torch, transformers", HOST_BASELINE_BYTES + (CUDA_HOST_EXTRA_BYTES if self.cuda else 0), "host")]
        if self.cuda:
            items.append(Item("CUDA context", CUDA_CONTEXT_BYTES, "device"))
        return items

    def held_items(self, kwargs_bytes: int) -> list[Item]:
        """What the job holds through the block loop: the baseline, the tokens, the streams, the block arguments."""
        place = {"device": self.dev, "cpu": "host", "disk": "disk"}[self.tier]
        inputs = self.inputs
        return self.baseline() + [
            Item("calibration tokens (int64)", 8 * inputs.n_samples * inputs.seq_len, "host"),
            Item(f"activation streams ({inputs.n_streams})", inputs.n_streams * self.stream, place),
            Item("block keyword arguments", kwargs_bytes, self.dev),
        ]

    def summary(self, kwargs_bytes: int) -> dict[str, int]:
        """The plan's ``sizes``: the numbers ``reconstruct plan`` and the tests read."""
        recon = self.inputs.recon is not None
        recon_act = self.recon_activations() if recon else 0
        return {
            "block": self.block, "block_stored": self.block_stored, "stream": self.stream,
            "n_streams": self.inputs.n_streams, "forward": self.trace["forward"],
            "statistics": self.stats, "prune": self.prune_tmp, "masks": self.masks,
            "recon_working_set": self.masks + self.recon_state + self.recon_step_activations() if recon else 0,
            "recon_activations": recon_act,
            "recon_step": self.trace.get("recon_step", 0), "recon_state": self.recon_state if recon else 0,
            "trainable": self.trainable, "merge": self.trace.get("merge", 0), "kwargs": kwargs_bytes,
        }

    def recon_step_activations(self) -> int:
        """Activations of one reconstruction micro-step (traced), training or evaluating."""
        return max(self.trace.get("recon_step", 0), self.trace.get("recon_eval", 0))

    def recon_activations(self) -> int:
        """``recon_step_activations`` plus the dense copy's forward for unit objectives (not traced)."""
        act = self.recon_step_activations()
        if unit_objective(self.inputs.recon):
            act += self.trace.get("forward_plain_recon", self.trace["forward_plain"])
        return act


def build_phases(sizes: TierSizes, held: list[Item]) -> tuple[list[Phase], list[str]]:
    """Every phase of the job in the order it runs, and the notes raised along the way."""
    notes: list[str] = []
    phases = [_calibration_phase(sizes, notes), *_block_start_phases(sizes, held)]
    base = held + [Item("block weights", sizes.block, sizes.dev)] + sizes.in_flight
    phases += _dense_phases(sizes, base, notes)
    phases += _prune_phases(sizes, base)
    phases += _recon_phases(sizes, base, notes)
    phases += _end_phases(sizes, held, base)
    return phases, notes


def _mask_item(sizes: TierSizes) -> Item:
    return Item("keep masks (bool)", sizes.masks, sizes.dev)


def _calibration_phase(sizes: TierSizes, notes: list[str]) -> Phase:
    inputs, probe, e = sizes.inputs, sizes.probe, element_size(sizes.inputs.dtype)
    if inputs.calib != "self":
        return Phase("tokenizing calibration text", sizes.baseline() + [
            Item("calibration text and tokenizer output", TOKENIZE_BYTES_PER_CHAR * text_chars(inputs.calib), "host")])
    model_bytes = probe.model_numel * e
    kv = 2 * probe.n_blocks * GENERATE_BATCH * inputs.seq_len * probe.hidden * e
    notes.append(f"--calib self loads the whole model ({human(model_bytes)}) to sample calibration sequences; "
                 "the streaming rule holds only with a text --calib")
    return Phase("self-calibration", sizes.baseline() + [
        Item("whole model (from_pretrained, then moved)", model_bytes, "host"),
        *([Item("whole model on the GPU", model_bytes, "device"),
           Item("KV cache of generate()", kv, "device")] if sizes.cuda else [Item("KV cache of generate()", kv, "host")]),
    ])


def _block_start_phases(sizes: TierSizes, held: list[Item]) -> list[Phase]:
    inputs, probe = sizes.inputs, sizes.probe
    e, es = element_size(inputs.dtype), element_size(inputs.stored_dtype)
    capture_act = 3 * inputs.micro_batch * inputs.seq_len * probe.hidden * e
    return [
        Phase("block-0 capture", held + [
            Item("embeddings and other modules before block 0", probe.outside_numel * e, sizes.dev),
            Item("their checkpoint pages (memory-mapped)", probe.outside_numel * es, "host"),
            Item("capture activations", capture_act, sizes.dev),
        ]),
        Phase("block load", held + sizes.in_flight + [
            Item("block weights", sizes.block, sizes.dev),
            Item("the block's checkpoint pages (memory-mapped, unmapped after the load)", sizes.block_stored, "host"),
            Item("block-0 only: pages of the modules before it, still mapped", probe.outside_numel * es, "host"),
        ]),
    ]


def _dense_phases(sizes: TierSizes, base: list[Item], notes: list[str]) -> list[Phase]:
    """The optional passes before pruning: OWL's allocation pre-pass and the dense pass."""
    inputs, trace, dev = sizes.inputs, sizes.trace, sizes.dev
    phases = []
    if inputs.allocation_pass:
        all_inputs = [i for _, i in sizes.linears.values()]
        phases.append(Phase(f"allocation pre-pass (--batch-size {inputs.micro_batch})", base + [
            Item("wanda statistics (every linear)", statistics_bytes("wanda", all_inputs), dev),
            Item("forward activations", trace["forward_plain"], dev),
            Item("outlier scores (largest linear, float32)", 4 * sizes.largest[0] * sizes.largest[1], dev),
            Item("allocator slack", sizes.slack(trace["forward_plain"]), dev),
        ]))
        notes.append("--allocation owl: before block 1, one more pass over the dense model (every block read once "
                     "more and run forward once, nothing pruned; the time of about one dense pass per block); its "
                     "per-block sparsities are saved in the manifest, so a resume does not repeat it")
    if inputs.check_stream:
        notes.append(f"stream check (--check-stream): before block 1, at every start, every block is read once more "
                     f"({human(sizes.probe.n_blocks * sizes.block_stored)} in all) and run twice on 2 short windows of "
                     "at most 1024 tokens, beside the model's own forward; --no-check-stream skips it")
    if inputs.n_streams == 2:
        on_its_way = inputs.micro_batch * inputs.seq_len * sizes.probe.hidden * element_size(inputs.dtype)
        phases.append(Phase(f"dense pass (--batch-size {inputs.micro_batch})", base + [
            Item("forward activations", trace["forward_plain"], dev),
            Item("allocator slack", sizes.slack(trace["forward_plain"]), dev),
            *([Item("output micro-batch on its way to the stream", on_its_way, "host")]
              if sizes.cuda and sizes.tier != "device" else []),
        ]))
    return phases


def _prune_phases(sizes: TierSizes, base: list[Item]) -> list[Phase]:
    inputs, trace, dev = sizes.inputs, sizes.trace, sizes.dev
    phases = []
    if trace.get("statistics_pass"):
        phases.append(Phase("statistics pass", base + [
            Item(f"{inputs.pruner} statistics", sizes.stats, dev),
            Item("forward activations + statistics temporaries", trace["statistics_pass"], dev),
            Item("allocator slack", sizes.slack(trace["statistics_pass"]), dev),
        ]))
    phases.append(Phase("pruning", base + [
        Item(f"{inputs.pruner} statistics", sizes.stats, dev), _mask_item(sizes),
        Item("pruner temporaries (largest linear)", sizes.prune_tmp, dev),
        Item("allocator slack", sizes.slack(sizes.prune_tmp), dev),
    ]))
    return phases


def _recon_phases(sizes: TierSizes, base: list[Item], notes: list[str]) -> list[Phase]:
    inputs, dev = sizes.inputs, sizes.dev
    if inputs.recon is None:
        return []
    recon_act = sizes.recon_activations()
    unit = unit_objective(inputs.recon)
    dense_copy = [Item("dense copy of the block (unit objective)", sizes.block, dev)] if unit else []
    if unit:  # its targets come from a no-grad forward of the dense copy inside every micro-step
        notes.append("--granularity/--target other than block/dense keeps a dense copy of the block and runs it "
                     "inside every training step; the plan adds one block and one forward for it (not traced)")
    return [
        Phase(f"reconstruction ({inputs.recon.method}, micro-batch {inputs.recon_micro_batch})", base + [
            _mask_item(sizes), *dense_copy,
            Item("trainable params + grads + AdamW state + step temporaries", sizes.recon_state, dev),
            Item("forward/backward of one micro-batch (traced)", recon_act, dev),
            Item("allocator slack", sizes.slack(recon_act), dev),
        ]),
        Phase("merge", base + [
            _mask_item(sizes), *dense_copy, Item("trainable params + AdamW state", sizes.trainable * 3, dev),
            Item("merged weight temporaries (largest linear)", sizes.trace.get("merge", 0), dev),
        ]),
    ]


def _end_phases(sizes: TierSizes, held: list[Item], base: list[Item]) -> list[Phase]:
    """The sparse pass, the block write, the stream checkpoint and the output assembly."""
    inputs, probe, trace, dev = sizes.inputs, sizes.probe, sizes.trace, sizes.dev
    es = element_size(inputs.stored_dtype)
    output_copy = sizes.cuda or inputs.stored_dtype != inputs.dtype
    phases = [
        Phase(f"sparse pass (--batch-size {inputs.micro_batch})", base + [
            _mask_item(sizes), Item("forward activations + MSE", trace["forward"], dev),
            Item("allocator slack", sizes.slack(trace["forward"]), dev),
        ]),
        Phase("block write", held + sizes.in_flight + [
            Item("block weights", sizes.block, dev),
            *([Item("block tensors for the output shard", sizes.block_stored, "host")] if output_copy else []),
        ]),
    ]
    if sizes.cuda and sizes.tier == "device":
        phases.append(Phase("stream checkpoint", held + [
            Item("the streams copied to host for the checkpoint", inputs.n_streams * sizes.stream, "host")]))
    phases.append(Phase("output assembly", held + [
        Item("tensors outside the blocks incl. the LM head (memory-mapped)",
             (probe.outside_numel + probe.head_numel) * es, "host"),
    ]))
    return phases


def closing_notes(sizes: TierSizes, pruner) -> list[str]:
    """What the plan assumes or leaves out, given the tier, the overlap and the pruner (an instance)."""
    inputs, notes = sizes.inputs, []
    if sizes.tier == "disk":
        notes.append("disk tier: the streams are memory-mapped files; their pages show in RSS while resident but "
                     "the kernel can drop them under pressure; resuming still loads a checkpoint whole into host memory")
    if sizes.in_flight:
        notes.append("block IO overlaps the compute: one block read ahead and one written behind (with its stream "
                     "checkpoint) are held in host memory; --no-overlap drops them and runs the IO serially")
    if sizes.cuda and sizes.tier == "device":
        notes.append("device tier: every stream checkpoint (--checkpoint-every) copies the streams to host memory")
    if inputs.pruner == "sparsegpt":
        notes.append("sparsegpt keeps one in x in float32 Gram matrix per linear, also for linears that read the "
                     f"same input (q/k/v), and all of a group at once ({human(sizes.stats)}); pruning one adds three "
                     "more in x in matrices (H, its Cholesky factor and inverse)")
    if getattr(pruner, "needs_block_training", False):
        notes.append(f"the {inputs.pruner} pruner trains the block to score weights; that pass is not in the plan")
    if getattr(inputs.pattern, "structured", False):
        notes.append(f"--pattern {inputs.pattern.kind}: pruner temporaries use the N:M formula (not profiled)")
    if sizes.trace.get("untraced"):
        notes.append("the block could not be traced on meta; activation sizes are a rough formula")
    return notes
