"""Integrations with other frameworks, one module each (imported on demand, so their libraries stay optional):

    from pydiffmed.integrations.monai import DiffusionInferer   # MONAI's inferers, sampling on pydiffmed's engine

Scheduler conversion (diffusers, MONAI) lives in pydiffmed.solvers (from_diffusers, from_monai).
"""
