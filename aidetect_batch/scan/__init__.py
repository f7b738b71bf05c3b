"""The scan job, stage by stage: the CPU stage (with its decode watchdog), device decode, the Classifier, the
sink and the runner.

Only :mod:`aidetect_batch.scan.runner` knows the order of the stages.
May import: ``inputs``, ``media``, ``detectors``, ``report`` and the top-level base modules.
"""
