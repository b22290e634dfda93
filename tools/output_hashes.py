"""Hash the output files of a grid of small jobs: a refactor must leave every hash unchanged.

Runs ``python -m reconstruct run`` (the command line, so module moves do not matter) for every
pruner × method on the tiny OPT, LLaMA and GPT-2 models that the tests build, plus structured
patterns, and prints one JSON object ``{job: {file: sha256}}`` covering every weight shard, the
index and the config (``reconstruct.json`` holds timings, so it is left out).

    python tools/output_hashes.py --work ../hashes-old > old.json   # at the old commit (--work: a new folder)
    python tools/output_hashes.py --work ../hashes-new > new.json   # at the new commit
    python tools/output_hashes.py --compare old.json new.json

A flag the new code adds with a default that changes outputs by design (``--model-check``) is passed
to every job of the new run only: ``--extra-flags "--model-check off"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
ARCHITECTURES = ("llama", "opt", "gpt2")
PRUNERS = ("magnitude", "wanda", "sparsegpt", "loraprune")
METHODS = ("none", "bias", "ln", "bias-ln", "masklora", "scalelora")
EXTRA_JOBS = {  # name → extra flags (on the LLaMA model)
    "heads": ["--pruner", "wanda", "--pattern", "heads", "--sparsity", "0.5", "--method", "masklora"],
    "channels": ["--pruner", "wanda", "--pattern", "channels", "--sparsity", "0.25", "--method", "bias-ln"],
    "2of4-sublayer": ["--pruner", "sparsegpt", "--pattern", "2:4", "--method", "masklora", "--granularity", "sublayer"],
    "cycles": ["--pruner", "wanda", "--sparsity", "0.7", "--cycles", "2", "--method", "bias-ln"],
}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file except the timing-bearing report."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and (path.suffix == ".safetensors" or path.name in ("config.json", "model.safetensors.index.json"))
    }


EXTRA_FLAGS: list[str] = []  # --extra-flags: appended to every job's command line


def run_job(model: Path, out: Path, flags: list[str]) -> dict[str, str]:
    """Run one small CPU job through the command line and hash its output."""
    command = [sys.executable, "-m", "reconstruct", "run", "--model", str(model), "--calib", str(CALIB),
               "--n-samples", "8", "--seq-len", "32", "--recon-steps", "4", "--device", "cpu", "--seed", "1",
               "--out", str(out), *flags, *EXTRA_FLAGS]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else str(done.returncode)}
    return file_hashes(out)


def collect(work: Path, architectures: tuple[str, ...] = ARCHITECTURES) -> dict[str, dict[str, str]]:
    """Build the tiny models in ``work`` and hash every job's output (the extra jobs need LLaMA)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_model  # noqa: E402 (the tests' own tiny models)

    results = {}
    for arch in architectures:
        model = save_tiny_model(arch, work / f"model-{arch}")
        for pruner in PRUNERS:
            for method in METHODS:
                name = f"{arch}-{pruner}-{method}"
                results[name] = run_job(model, work / name, ["--pruner", pruner, "--method", method])
                print(name, "error" in results[name] and results[name]["error"] or "ok", file=sys.stderr)
    for name, flags in EXTRA_JOBS.items() if "llama" in architectures else ():
        results[name] = run_job(work / "model-llama", work / name, flags)
        print(name, "ok" if "error" not in results[name] else results[name]["error"], file=sys.stderr)
    return results


def compare(old: dict, new: dict) -> int:
    """Print the jobs (present in both) whose hashes differ; returns the number of differences."""
    common = old.keys() & new.keys()
    differing = sorted(name for name in common if old[name] != new[name])
    for name in differing:
        print(f"differs: {name}")
    print(f"{len(common) - len(differing)} of {len(common)} jobs in both runs identical")
    return len(differing)


def main() -> None:
    """Hash a new grid of jobs into ``--work`` and print the JSON, or ``--compare`` two such files (exit 1 when they differ)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="empty folder for the models and outputs")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--arch", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES),
                        help="only these tiny models (a quicker check)")
    parser.add_argument("--extra-flags", default="", help="appended to every job's command line (quoted)")
    args = parser.parse_args()
    EXTRA_FLAGS.extend(args.extra_flags.split())
    if args.compare:
        old, new = (json.loads(path.read_text()) for path in args.compare)
        sys.exit(1 if compare(old, new) else 0)
    args.work.mkdir(parents=True, exist_ok=False)
    print(json.dumps(collect(args.work, tuple(args.arch)), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
