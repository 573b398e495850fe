from setuptools import find_packages, setup

setup(
    name="hope",
    version="0.1.0",
    description="Hope (Nested Learning, NeurIPS 2025): a Hugging Face model with Triton kernels for its in-context memories",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hope", "hope.*", "hope_kernels", "hope_kernels.*"]),
    python_requires=">=3.10",
    # torch is a lower bound only: an installed torch (the CPU wheel here, a CUDA build on a GPU box) is kept.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors",
        "datasets",
        "accelerate",
        "tqdm",
        "numpy",
        "matplotlib",
    ],
    entry_points={"console_scripts": ["hope-train = hope.train:main", "hope-eval = hope.eval:main",
                                      "hope-learn = hope.continual:main"]},
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "triton>=3.6; platform_system == 'Linux'",
                "peft>=0.21", "lm-eval>=0.4.13"],  # the client tests (tests/hope/test_hf_clients.py)
        "cuda": ["flash-attn"],
    },
)
