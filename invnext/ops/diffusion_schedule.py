"""The diffusion decoder's schedule tables: defined in :mod:`invnext.common.diffusion_schedule`,
below the ops, because the Triton kernels read them too."""
from invnext.common.diffusion_schedule import (
    MAX_BETA,
    SCHEDULE_KINDS,
    TABLE_NAMES,
    DiffusionSchedule,
    make_schedule,
    space_timesteps,
)

__all__ = ["MAX_BETA", "SCHEDULE_KINDS", "TABLE_NAMES", "DiffusionSchedule", "make_schedule", "space_timesteps"]
