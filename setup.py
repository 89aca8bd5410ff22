"""Build script: the Python package, plus the optional C++/CUDA extensions (see csrc/)."""

from setuptools import setup

setup(
    packages=["spguard", "spguard.ops", "spguard.world", "spguard.kernels"],
    package_dir={"spguard": "spguard", "spguard.kernels": "kernels"},
)
