"""Names people write for our parameters, and the declared name a key most likely meant.

Pure Python: used by the spec (look-alike traps), the fallback check and the config check.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping, Optional, Tuple

# Words people write for our parameters (other libraries' names, paper symbols,
# misspellings). Spelling variants (case, plural, trailing "_", "-" for "_") are
# generated from every declared name by `spelling_variants`.
SYNONYMS: Mapping[str, str] = {
    "step": "steps",
    "iter": "steps",
    "iters": "steps",
    "iteration": "steps",
    "iterations": "steps",
    "num_steps": "steps",
    "n_steps": "steps",
    "max_steps": "steps",
    "num_iters": "steps",
    "num_iterations": "steps",
    "n_iter": "steps",
    "n_iters": "steps",
    "epochs": "steps",
    "num_epochs": "steps",
    "learning_rate": "lr",
    "learningrate": "lr",
    "lr_rate": "lr",
    "step_size": "lr",
    "lamda": "lambda",
    "lambd": "lambda",
    "lmbda": "lambda",
    "lam": "lambda",
    "scaling_coef": "lambda",
    "scaling_coefficient": "lambda",
    "scaling_factor": "lambda",
    "ridge": "omega",
    "reg": "omega",
    "regularization": "omega",
    "densities": "density",
    "keep_ratio": "density",
    "top_k": "density",
    "topk": "density",
    "trim": "density",
    "equalise": "equalize",
    "equal_norms": "equalize",
    "equalize_norms": "equalize",
    "subspace_ratio": "subspace",
    "common_fraction": "common_space_fraction",
    "common_ratio": "common_space_fraction",
    "common_space": "common_space_fraction",
    "common_space_ratio": "common_space_fraction",
    "fall_back": "fallback",
    "fallback_method": "fallback",
    "fallback_merge_method": "fallback",
    "solver": "solve",
    "transpose": "input_major",
    "transposed": "input_major",
    "conv1d": "input_major",
}

_CUTOFF = 0.75  # difflib ratio; "stpes" -> "steps" is 0.8, "eta" -> "beta" 0.86


def _normal(key: str) -> str:
    return key.strip().lower().replace("-", "_").strip("_")


def suggest(key: str, names: Iterable[str]) -> Optional[str]:
    """The declared name that `key` most likely meant, or None.

    Synonym table first, then the same key up to case, "-"/"_" and surrounding "_",
    then its singular/plural, then difflib's closest name above `_CUTOFF`.
    """
    names = sorted(set(names))
    normal = _normal(key)
    by_normal = {_normal(name): name for name in names}
    target = SYNONYMS.get(normal)
    if target is not None and target in names:
        return target
    for candidate in (normal, normal[:-1] if normal.endswith("s") else normal + "s"):
        if candidate in by_normal:
            return by_normal[candidate]
    close = difflib.get_close_matches(normal, list(by_normal), n=1, cutoff=_CUTOFF)
    return by_normal[close[0]] if close else None


def spelling_variants(name: str) -> Tuple[str, ...]:
    """The ways people misspell a declared name: trailing "_", case, "-" for "_", plural."""
    forms = {name + "_", name.capitalize(), name.upper(), name.replace("_", "-")}
    forms.add(name[:-1] if name.endswith("s") else name + "s")
    return tuple(forms)
