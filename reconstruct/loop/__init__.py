"""The block loop: run_job, the per-block pipeline and its context, objectives and statistics hooks."""
