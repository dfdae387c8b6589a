"""Time one full gc.collect() in a process holding the trainer's state (tiny model, Megatron
DDP + distributed optimizer), before and after gc.freeze() of that startup heap. Not a test.

    .venv/bin/python benchmarks/gc_pause.py
"""
from __future__ import annotations

import gc
import json
import time


def median_collect_ms(n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    import torch

    from megatron_cpt.models.qwen2 import ModelConfig
    from megatron_cpt.runtime import compute_device, init_distributed
    from megatron_cpt.training.config import TrainConfig
    from megatron_cpt.training.loop import build_training_state

    cfg = TrainConfig.from_dict({"run_dir": "/x", "model": {"pretrained": "-"},
                                 "data": {"train": [{"prefix": "/a"}]}, "budget": {"iterations": 10}})
    init_distributed(1, 1, seed=0)
    state = build_training_state(cfg, ModelConfig.load("tiny-a"), torch.float32, 10,  # noqa: F841
                                 compute_device())
    gc.collect()
    plain, tracked = median_collect_ms(), len(gc.get_objects())
    gc.freeze()
    print(json.dumps({"objects_tracked": tracked, "full_collect_ms": plain,
                      "after_freeze_ms": median_collect_ms()}))


if __name__ == "__main__":
    main()
