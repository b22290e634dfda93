"""The memory planner: budget, estimate and plan of a job's peak bytes before any work."""
