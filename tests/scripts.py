"""Imports the repository's scripts (examples/, benchmarks/) as modules for the tests."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(folder: str, name: str):
  spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses (flax structs) look their module up
  spec.loader.exec_module(module)
  return module
