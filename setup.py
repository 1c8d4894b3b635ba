"""Only the optional C extension lives here; everything else is in pyproject.toml.

If the compiler is missing, the install still succeeds and the pure-Python scanner is used.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("collector.decode._wirescan", ["collector/decode/_wirescan.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
