"""Durable job state in --out: lock, manifest, fingerprint, atomic writes, activation checkpoints, status."""
