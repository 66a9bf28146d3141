"""nnfast: Triton kernels for training transformer language models fast.

The top-level ``kernels/`` folder is installed as ``nnfast.kernels`` (never as a
top-level ``kernels`` package: PyPI already has one of that name).
"""

from setuptools import setup

setup(
    name="nnfast",
    version="0.1.0",
    description="Fused Triton kernels and models for training transformer language models fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "nnfast",
        "nnfast.reference",
        "nnfast.modules",
        "nnfast.models",
        "nnfast.models.hf",
        "nnfast.kernels",
    ],
    package_dir={"nnfast": "nnfast", "nnfast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tiktoken",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "ruff", "safetensors",
                "transformers"],
        "hf": ["transformers", "safetensors"],
        "plot": ["matplotlib"],
    },
)
