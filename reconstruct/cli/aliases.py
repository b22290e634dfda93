"""Old flag names that still work: hidden from ``--help``, rewritten to the new name with a notice.

One idea has one name in every command (``tests/test_flag_names.py`` compares the ``--help`` of
``run``, ``plan``, ``sweep``, ``retrain`` and ``eval``). The names used before stay accepted so
scripts keep running; each use prints one line saying which name replaces it. The new names are the
specs' own (``reconstruct.flags``); this table is the command line's history, so it lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

_RUN_LIKE = {  # run, plan and sweep take the same job flags
    "--micro-batch": "--batch-size",
    "--recon-batch": "--recon-samples-per-step",
    "--retrain-batch": "--retrain-samples-per-step",
    "--retrain-windows": "--retrain-n-samples",
    "--eval-seq-len": "--max-length",
    "--eval-windows": "--limit",
}

DEPRECATED_FLAGS: dict[str, dict[str, str]] = {  # command -> {old flag: new flag}
    "run": dict(_RUN_LIKE),
    "plan": dict(_RUN_LIKE),
    "sweep": {**_RUN_LIKE, "--eval-data": "--eval"},
    "retrain": {
        "--micro-batch": "--batch-size",
        "--batch": "--samples-per-step",
        "--n-windows": "--n-samples",
        "--eval-seq-len": "--max-length",
        "--eval-windows": "--limit",
    },
    "eval": {"--seq-len": "--max-length", "--max-windows": "--limit"},
}


def rewrite_deprecated(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Replace old flag names in a command line by their new names.

    Args:
        args: the command line after the program name (``["run", "--micro-batch", "4", ...]``).

    Returns:
        The rewritten arguments and one notice per old name used (``--micro-batch is deprecated;
        use --batch-size``). Arguments after ``--`` and option values are never touched.
    """
    args = list(args)
    command = next((arg for arg in args if not arg.startswith("-")), None)
    renames = DEPRECATED_FLAGS.get(command or "", {})
    notices: list[str] = []
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            out += args[index:]
            break
        name, equals, value = arg.partition("=")
        new = renames.get(name)
        if new is None:
            out.append(arg)
            continue
        out.append(new + equals + value)
        notice = f"warning: {name} is deprecated; use {new} (same meaning)"
        if notice not in notices:
            notices.append(notice)
    return out, notices
