"""Packages are discovered, never listed by hand (a listed one was forgotten: the wheel lacked imgsearch.evaluation).
ingest/ and api/ install as imgsearch.ingest and imgsearch.api (pyproject.toml's package-dir); everything else is in
pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = {"imgsearch.ingest": "ingest", "imgsearch.api": "api"}  # as in [tool.setuptools.package-dir]

packages = find_packages(include=["imgsearch", "imgsearch.*"])
for package, folder in MAPPED.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages)
