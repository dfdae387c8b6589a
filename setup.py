"""megatron-cpt: continued pretraining of Qwen2.5 on Megatron-core for the
domain-specialization x model-size study (arXiv 2501.02068)."""
from setuptools import find_packages, setup

setup(
    name="megatron-cpt",
    version="0.1.0",
    description="Compute-budgeted continued pretraining on Megatron-core: data prep, "
    "Qwen2.5 conversion, TP/PP/DP training, SLURM launch, evaluation and reports.",
    python_requires=">=3.10",
    # eval/exams holds data only (the shipped exams); declared as a package of data so
    # setuptools installs it without its "absent from packages" warning
    packages=find_packages(include=["megatron_cpt*", "data_prep*", "eval*"]) + ["eval.exams"],
    package_data={"": ["*.yaml", "*.jsonl", "*.json"], "eval.exams": ["*.jsonl"]},
    include_package_data=True,
    install_requires=[
        # torch is not pinned here so NGC / cluster builds of torch are kept;
        # `make setup` pins it exactly through constraints.txt.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # imported (undeclared) by megatron-core's checkpoint writer
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "numpy",
        "pyyaml",
        "tqdm",
        # data_prep: pipeline executors (local/SLURM) and fsspec I/O, domain classifier,
        # compressed and Parquet inputs, SentencePiece tokenizers
        "datatrove>=0.10,<0.11",
        "fasttext-numpy2",  # the `fasttext` 0.9.3 binding breaks under numpy 2 (predict)
        "py3langid",  # language identification; its model ships inside the wheel (no download)
        "zstandard",
        "pyarrow",
        "sentencepiece",
        "submitit>=1.5",  # the SLURM grid launcher (job arrays, requeue, torch.distributed env)
        "matplotlib",  # report plots (Agg backend)
        "scipy",  # report: the mixture law (bounded nonlinear least squares)
        "tensorboard",  # training event files (the trainer falls back to metrics.jsonl without it)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "eval": ["lm-eval[hf]"],
        "test": ["pytest"],
        # experiment tracking (logging.wandb / logging.mlflow); mlflow-skinny is MLflow's
        # client with the local file store, without the server's dependencies
        "tracking": ["wandb", "mlflow-skinny"],
    },
    entry_points={"console_scripts": ["megatron-cpt=megatron_cpt.cli:main"]},
)
