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
    packages=find_packages(include=["megatron_bloom", "megatron_bloom.*"]),
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
    entry_points={
        "console_scripts": [
            "megatron-bloom-pretrain=megatron_bloom.cli:pretrain_main",
            "megatron-bloom-evaluate=megatron_bloom.evaluation.cli:console_main",
            "megatron-bloom-lm-eval=megatron_bloom.evaluation.harness:cli_main",
        ],
    },
)
