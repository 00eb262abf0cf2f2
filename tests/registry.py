"""The method names the tests parametrise over: every solver of the package, from its registry."""

import dataclasses

from mergekit_wudi.solvers import SOLVERS

METHODS = tuple(solver.name for solver in SOLVERS)
SOLVER_OF = {solver.name: solver for solver in SOLVERS}


def quick_parameters(method: str, steps: int = 50) -> dict:
    """Parameters that keep an iterative method's test fast: `steps` where it has one."""
    fields = {field.name for field in dataclasses.fields(SOLVER_OF[method].config_cls)}
    return {"steps": steps} if "steps" in fields else {}
