"""Reporting tools: report.md / report.png, sweeps, and inspection of a pruned folder."""
