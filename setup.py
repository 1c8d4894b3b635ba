"""Package layout and the optional C extension; everything else is in pyproject.toml.

The design card keeps ``collector/``, ``analyzers/`` and ``exporters/`` as top-level folders, but installs them
under one distinct name (``shadowlens.collector`` ...) so they never clash with other distributions' packages.

If the compiler is missing, the install still succeeds and the pure-Python scanner is used.
"""
from setuptools import Extension, find_packages, setup

LAYERS = ("collector", "analyzers", "exporters")
package_dir = {"shadowlens": "shadowlens", **{f"shadowlens.{layer}": layer for layer in LAYERS}}
packages = ["shadowlens"] + [f"shadowlens.{layer}" for layer in LAYERS] + [
    f"shadowlens.{layer}.{sub}" for layer in LAYERS for sub in find_packages(layer)]

setup(package_dir=package_dir, packages=packages,
      ext_modules=[Extension("shadowlens.collector.decode._wirescan", ["collector/decode/_wirescan.c"],
                             extra_compile_args=["-O2", "-Wall"], optional=True)])
