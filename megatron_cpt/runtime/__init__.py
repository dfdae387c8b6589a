"""Process runtime: device choice, distributed init, seeding."""
from megatron_cpt.runtime.device import setup_device
from megatron_cpt.runtime.distributed import DistEnv, init_distributed, set_seed, shutdown

__all__ = ["DistEnv", "init_distributed", "set_seed", "setup_device", "shutdown"]
