"""The memory plan: the phases of a job, what is alive in each, the peaks, and the plan as text."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from reconstruct.planner.budget import GIB, human

logger = logging.getLogger(__name__)

@dataclass
class Item:
    """One allocation in one phase."""

    name: str
    nbytes: int
    place: str  # "device", "host" or "disk"


@dataclass
class Phase:
    """What is alive at the peak of one step of the job."""

    name: str
    items: list[Item]

    def total(self, place: str) -> int:
        """Bytes alive on ``place`` in this phase."""
        return sum(item.nbytes for item in self.items if item.place == place)


@dataclass
class MemoryPlan:
    """The predicted memory of one job. Build it with :func:`plan_job` or :func:`plan_from_config`."""

    title: str  # model, device, dtype, job in one line
    device_type: str  # "cuda" or "cpu"
    stream_tier: str  # device, cpu or disk: where the activation streams go
    tier_note: str  # why that tier
    sizes: dict[str, int]  # the headline quantities (block, streams, working set parts)
    phases: list[Phase]
    device_budget: int | None
    host_budget: int | None
    notes: list[str] = field(default_factory=list)
    job_micro_batch: int = 1
    recon_micro_batch: int = 1
    device_reason: str = ""  # which device the plan is for and why (``reconstruct plan``)

    def peak(self, place: str) -> tuple[int, str]:
        """(bytes, phase name) of the largest phase on ``place``."""
        best = max(self.phases, key=lambda phase: phase.total(place))
        return best.total(place), best.name

    @property
    def device_peak(self) -> int:
        """Predicted peak GPU memory (0 on CPU runs: everything is host memory)."""
        return self.peak("device")[0] if self.device_type == "cuda" else 0

    @property
    def host_peak(self) -> int:
        """Predicted peak host memory (RSS)."""
        return self.peak("host")[0]

    def problems(self) -> list[str]:
        """One line per side whose peak exceeds its budget."""
        found = []
        if self.device_type == "cuda" and self.device_budget is not None and self.device_peak > self.device_budget:
            found.append(f"GPU: peak {human(self.device_peak)} ({self.peak('device')[1]}) > budget "
                         f"{human(self.device_budget)}")
        if self.host_budget is not None and self.host_peak > self.host_budget:
            found.append(f"host: peak {human(self.host_peak)} ({self.peak('host')[1]}) > budget "
                         f"{human(self.host_budget)}")
        return found

    @property
    def fits(self) -> bool:
        """True when both peaks are within their budgets (an unknown budget always fits)."""
        return not self.problems()

    def advice(self) -> list[str]:
        """Flags that would shrink the side(s) over budget, most effective first."""
        tips: list[str] = []
        streams = self.sizes["n_streams"] * self.sizes["stream"]
        over_device = self.device_type == "cuda" and self.device_budget is not None and self.device_peak > self.device_budget
        over_host = self.host_budget is not None and self.host_peak > self.host_budget
        if over_device and self.stream_tier == "device":
            tips.append(f"--offload cpu (moves the {human(streams)} of activation streams to host memory)")
        streams_on_host = self.stream_tier == "cpu" or (self.stream_tier == "device" and self.device_type == "cpu")
        if over_host and streams_on_host:
            tips.append(f"--offload disk (moves the {human(streams)} of activation streams to memory-mapped files)")
        over_in_self = [place for place, over in (("device", over_device), ("host", over_host))
                        if over and self.peak(place)[1] == "self-calibration"]
        if over_in_self:
            tips.insert(0, "--calib <text file> (--calib self loads the whole model to sample sequences)")
        forward = self.sizes.get("forward", 0)
        if self.job_micro_batch > 1 and (over_device or (over_host and self.device_type == "cpu")):
            tips.append(f"--batch-size {max(1, self.job_micro_batch // 4)} (forward activations at --batch-size "
                        f"{self.job_micro_batch}: {human(forward)})")
        tips.append(f"--n-samples / --seq-len (each stream is n_samples x seq_len x hidden: {human(self.sizes['stream'])}; "
                    "--seq-len also shrinks every activation)")
        if self.sizes.get("statistics", 0) > GIB:
            tips.append(f"--sequential (pruner statistics for one sub-layer group at a time instead of "
                        f"{human(self.sizes['statistics'])})")
        return tips

    def refusal(self) -> str:
        """The one-line error ``run`` raises when the plan does not fit."""
        return (
            "the memory plan does not fit: " + "; ".join(self.problems())
            + ". Change: " + "; ".join(self.advice())
            + " (see `reconstruct plan` with the same flags; --gpu-memory/--host-memory set the budgets)"
        )

    def format(self) -> str:
        """The plan as text: headline sizes, where each goes, the peak phase of each side."""
        dev = "device" if self.device_type == "cuda" else "host"
        sizes = self.sizes
        stream_place = {"device": dev, "cpu": "host" + (" (pinned)" if self.device_type == "cuda" else ""),
                        "disk": "disk (memory-mapped files)"}[self.stream_tier]
        lines = [self.title, *([f"device: {self.device_reason}"] if self.device_reason else []), ""]
        rows = [
            ("one block (weights)", sizes["block"], dev),
            ("activation streams", sizes["n_streams"] * sizes["stream"],
             f"{stream_place}: {sizes['n_streams']} x {human(sizes['stream'])}; {self.tier_note}"),
            (f"forward, --batch-size {self.job_micro_batch}", sizes["forward"], dev),
            ("pruner statistics (largest group)", sizes["statistics"], dev),
            ("pruner temporaries (largest linear)", sizes["prune"], dev),
            ("keep masks", sizes["masks"], dev),
        ]
        if sizes.get("recon_working_set"):
            rows += [
                ("reconstruction working set", sizes["recon_working_set"], dev),
                (f"  fwd/bwd of {self.recon_micro_batch} sample(s) with adapters", sizes["recon_activations"],
                 "traced (or the MSE pass at --batch-size, if larger)"),
                ("  trainable params + AdamW state", sizes["recon_state"], "params, 2 moments, step temporaries"),
                ("  keep masks (counted above)", sizes["masks"], ""),
                ("merge temporaries", sizes["merge"], "largest linear, after training"),
            ]
        width = max(len(name) for name, _, _ in rows)
        for name, value, where in rows:
            lines.append(f"  {name:<{width}}  {human(value):>11}  {where}")
        lines.append("")
        for place, budget, flag in (("device", self.device_budget, "--gpu-memory"), ("host", self.host_budget, "--host-memory")):
            if place == "device" and self.device_type != "cuda":
                continue
            total, phase_name = self.peak(place)
            verdict = "unknown budget" if budget is None else (
                f"fits in {human(budget)}" if total <= budget else f"DOES NOT FIT in {human(budget)}")
            label = "GPU" if place == "device" else "host"
            lines.append(f"  peak {label}: {human(total)} during {phase_name}: {verdict} ({flag})")
            phase = next(p for p in self.phases if p.name == phase_name)
            for item in sorted(phase.items, key=lambda it: -it.nbytes):
                if item.place == place and item.nbytes > 0:
                    lines.append(f"      {human(item.nbytes):>11}  {item.name}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if not self.fits:
            lines.append("  to fit: " + "; ".join(self.advice()))
        return "\n".join(lines)


def log_plan(plan: MemoryPlan, level: int = logging.INFO) -> None:
    """Log the plan, one line per text line (at ``level``)."""
    for line in plan.format().splitlines():
        logger.log(level, "%s", line)
