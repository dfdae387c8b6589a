#!/usr/bin/env bash
# Download, on a machine with registry access, the wheels a lent GPU machine lacks, into .whl/
# (git-ignored; pass it to the device run as a carried path). benchmarks/gpu_check.sh installs
# them there with `pip install --no-index --no-deps --target` when megatron-core does not import.
#
#   bash benchmarks/gpu_wheels.sh          # megatron-core 0.16.1 + zstandard (about 8 MB)
#   bash benchmarks/gpu_wheels.sh --eval   # also lm-eval and what its import path needs there
#
# The GPU machine runs Python 3.12 (cp312 wheels) and has torch, transformers, tokenizers,
# safetensors, numpy, pyyaml, tqdm, psutil, pyarrow; nothing is installed from a registry on it.
# What travels with a device run is capped at 64 MiB: --eval adds about 30 MB; it is optional
# because lm-eval's closure there is not verified (the eval_run step says what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(megatron-core==0.16.1 zstandard)
if [[ ${1:-} == --eval ]]; then
    # lm-eval's import path (eval run, native backend, local JSON tasks) beyond the machine's
    # packages, pinned as in the development environment
    PACKAGES+=(lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
               sacrebleu==2.6.0 portalocker==4.4.2 colorama==0.4.6 tabulate==0.10.0 lxml==6.2.0
               pandas==3.1.1 pytz==2026.6 more-itertools==11.2.1)
fi

mkdir -p .whl
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
du -sh .whl
