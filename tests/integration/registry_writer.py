"""Saves versions of a largish random model into a registry in a loop until killed."""

import sys

from shared.registry import ModelRegistry
from tests.helpers import random_tiny_model

if __name__ == "__main__":
    model, tok = random_tiny_model(hidden=512, layers=8)
    registry = ModelRegistry(sys.argv[1])
    while True:
        registry.save(model, tok, kind="sft")
