"""Build the tiny model on CPU with the TransformerConfig a *GPU* would get (issue 24, item 2).

Usage: python tests/helpers/build_for_probe.py PROBE.json   (one process, gloo)
PROBE: KernelProbe fields, e.g. CUDA without Transformer Engine or APEX. The fusion decision
(models/fusions.py) answers for that machine; the model is then built with exactly those
``TransformerConfig`` fields, in bf16. Prints {"fields": ..., "dtypes": [...]}; a flag that
needs a missing kernel fails the build (as ``persist_layer_norm`` did on the first GPU run).
"""
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_cpt.models import fusions
    from megatron_cpt.models.qwen2 import BuildOptions, ModelConfig, build_gpt_model, fusion_fields
    from megatron_cpt.runtime import init_distributed, shutdown

    probe = fusions.KernelProbe(**json.loads(Path(sys.argv[1]).read_text()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed(1, 1)
    opts = BuildOptions(params_dtype=torch.bfloat16, use_te=False, kernel_probe=probe)
    gpt = build_gpt_model(ModelConfig.load("tiny-a"), opts)
    print(json.dumps({"fields": fusion_fields(opts), "persist": gpt.config.persist_layer_norm,
                      "dtypes": sorted({str(p.dtype) for p in gpt.parameters()})}))
    shutdown()


if __name__ == "__main__":
    main()
