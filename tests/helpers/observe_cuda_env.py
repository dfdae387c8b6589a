"""Run ``megatron-cpt ARGS`` in a launched rank, but stop it where CUDA would initialise.

Usage: torchrun ... tests/helpers/observe_cuda_env.py OUT_DIR train --config ... [overrides]
At ``setup_device()`` (the first CUDA call: ``torch.cuda.set_device``) each rank writes
``OUT_DIR/rank<R>.json`` with the CUDA_DEVICE_MAX_CONNECTIONS value it sees, then exits 0
before any collective. Everything before that point is the real trainer.
"""
import json
import os
import sys
from pathlib import Path

from megatron_cpt.runtime import distributed

OUT = Path(sys.argv[1])


def _observe():
    rank = os.environ.get("RANK", "0")
    (OUT / f"rank{rank}.json").write_text(json.dumps(
        {"value": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}))
    raise SystemExit(0)


distributed.setup_device = _observe  # init_distributed's first call, before CUDA would start

if __name__ == "__main__":
    from megatron_cpt.cli import main

    sys.exit(main(sys.argv[2:]))
