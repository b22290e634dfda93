"""The job drivers: the top layer, above everything but the command line.

Each module here runs one kind of job from start to finish on the layers below it (model I/O, job
state, methods, the block loop, retraining, shrinking, reporting), and nothing below imports it:
``run_job`` (the ``run`` command), ``retrain_job``, the retraining and LoRAPrune stages of a run,
``sweep``, ``validation`` (a job's flags checked against its model before any work) and ``finish``
(the evaluations that complete a report). A run's state in ``--out`` is ``job_state`` with its parts:
``run_fingerprint``, ``calibration_tokens``, ``activation_streams``; every command opens its folder
through ``state.job_folder`` and writes its model through ``modelio.output``.
"""
