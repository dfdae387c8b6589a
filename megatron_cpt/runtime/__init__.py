"""Process runtime: device choice, distributed init, seeding."""
from megatron_cpt.runtime.device import collective_device, compute_device, setup_device
from megatron_cpt.runtime.distributed import (DistEnv, all_reduce_values, broadcast_values,
                                              init_distributed, set_seed, shutdown)

__all__ = ["DistEnv", "all_reduce_values", "broadcast_values", "collective_device",
           "compute_device", "init_distributed", "set_seed", "setup_device", "shutdown"]
