"""Build script. Package metadata lives in pyproject.toml; this file exists for the
compiled extension in csrc/ (see the ladder-extension work), which needs torch at
build time: install with ``pip install --no-build-isolation -e .``."""
from setuptools import setup

setup()
