"""Packaging for megatron-bloom.

torch is deliberately left unpinned here: install the build you want first (the Makefile installs
the CPU wheel `torch==2.13.0`); a bare `torch` requirement resolved from scratch would pull a
multi-GB CUDA build on machines that have no GPU.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_bloom",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining and finetuning for the BLOOM model family",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # data_tools and benchmarks are packages too, so that `from data_tools.make_tasks import ...` and
    # `benchmarks.common` import from anywhere (tests, the demo) without touching sys.path.
    packages=find_packages(include=["megatron_bloom", "megatron_bloom.*", "data_tools", "benchmarks"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "tokenizers>=0.15",
        "transformers>=4.40",
        "safetensors>=0.4",
        "datasets>=2.18",
        "tensorboard>=2.14",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "wandb": ["wandb>=0.16"],
        # dev installs the optional integrations too, so their tests run rather than skip.
        "eval": ["lm-eval[hf]==0.4.13"],
        # bench: the PNG plots of benchmarks/ (--plot DIR).
        "bench": ["matplotlib>=3.7"],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.2", "pyarrow>=14", "wandb>=0.16", "lm-eval[hf]==0.4.13",
                "matplotlib>=3.7"],
    },
    # One console script per command, megatron-bloom-<command>: the same entry point as
    # launch/<command>.py (data_tools/<tool>.py for the data tools).
    entry_points={
        "console_scripts": [
            "megatron-bloom-pretrain=megatron_bloom.cli:pretrain_main",
            "megatron-bloom-finetune=megatron_bloom.commands.finetune:main",
            "megatron-bloom-generate=megatron_bloom.commands.generate:main",
            "megatron-bloom-evaluate=megatron_bloom.evaluation.cli:console_main",
            "megatron-bloom-lm-eval=megatron_bloom.commands.lm_eval_harness:main",
            "megatron-bloom-convert-checkpoint=megatron_bloom.commands.convert_checkpoint:main",
            "megatron-bloom-plan=megatron_bloom.commands.plan:main",
            "megatron-bloom-demo=megatron_bloom.commands.demo:main",
            "megatron-bloom-preprocess-data=data_tools.preprocess_data:main",
            "megatron-bloom-preprocess-xp3=data_tools.preprocess_xp3:main",
            "megatron-bloom-train-tokenizer=data_tools.train_tokenizer:main",
            "megatron-bloom-merge-datasets=data_tools.merge_datasets:main",
            "megatron-bloom-inspect-data=data_tools.inspect_data:main",
            "megatron-bloom-make-corpus=data_tools.make_corpus:main",
            "megatron-bloom-make-tasks=data_tools.make_tasks:main",
            "megatron-bloom-language-weights=data_tools.language_weights:main",
            "megatron-bloom-corpus=data_tools.corpus:main",
        ],
    },
)
