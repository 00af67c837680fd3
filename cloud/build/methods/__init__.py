"""Pruning methods, by name, and the scorers and masks they share.

A method is one module that defines its settings dataclass and a `Method` (`cloud.build.methods.base`);
registering it is one line here, and its settings become `portfolio build` flags of their own.
"""

from cloud.build.methods import reconvene, shifter, structured
from cloud.build.methods.base import Method
from common.registry import lookup

METHODS: dict[str, Method] = {"shifter": shifter.METHOD, "reconvene": reconvene.METHOD, "structured": structured.METHOD}


def get(name: str) -> Method:
    """The method registered as `name`; a miss lists the known ones."""
    return lookup(METHODS, "method", name)
