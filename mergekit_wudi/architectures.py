"""Repaired copies of mergekit 0.1.5 architecture definitions that cannot be merged as shipped.

mergekit 0.1.5's bundled `bert.json` (architecture `BertModel`, the layout of every
sentence-transformers BERT checkpoint such as all-MiniLM-L6-v2) declares the optional
buffer `embeddings.position_ids` with aliases. For an optional weight mergekit's planner
evaluates `[name] + aliases` while it stores aliases as a tuple, so every merge of a
`BertModel` checkpoint, whatever the method, stops before writing anything with
`TypeError: can only concatenate list (not "tuple") to list` (mergekit/plan.py, plan_tensor).

`register_architectures()` takes each bundled JSON definition with such an optional,
aliased weight, drops the aliases of its optional weights (the weight itself, under its
own name, is still merged when present), parses it with mergekit's own JSON architecture
classes, and puts it first among the definitions mergekit has for that architecture name;
mergekit takes the first one whose `model_type` matches. Nothing else changes: every
required weight, alias, vocabulary axis and layer template is mergekit's. It is called by
`mergekit_wudi.register()`, so a plain `mergekit-yaml` run merges BERT checkpoints.
"""

import importlib.resources
import json
import logging

logger = logging.getLogger(__name__)


def register_architectures() -> tuple:
    """Put the repaired definitions in front of mergekit's; return the architecture names added. Idempotent."""
    import mergekit._data.architectures
    from mergekit.architecture.base import ModelArchitecture, ModuleDefinition
    from mergekit.architecture.json_definitions import NAME_TO_ARCH, JsonModuleArchDef, JsonModuleArchitecture

    added = []
    for resource in importlib.resources.files(mergekit._data.architectures).iterdir():
        if not resource.name.endswith(".json"):
            continue
        data = json.loads(resource.read_text())
        if data.get("kind", "module") != "module" or not _drop_optional_aliases(data):
            continue
        module = JsonModuleArchitecture(definition=JsonModuleArchDef.model_validate(data))
        repaired = ModelArchitecture(
            modules={"default": ModuleDefinition(architecture=module)},
            architectures=module.definition.architectures,
            model_type=module.definition.expected_model_type,
        )
        for name in repaired.architectures:
            candidates = NAME_TO_ARCH.setdefault(name, [])
            if repaired in candidates:
                continue
            candidates.insert(0, repaired)
            added.append(name)
            logger.debug("mergekit-wudi: repaired architecture definition %s from %s", name, resource.name)
    return tuple(added)


def _drop_optional_aliases(definition: dict) -> bool:
    """Remove `aliases` from every optional weight of a JSON definition, in place; True if any were removed."""
    weights = [
        *definition.get("pre_weights", []),
        *definition.get("post_weights", []),
        *definition.get("layer_templates", {}).get("weights", []),
    ]
    changed = False
    for weight in weights:
        if weight.get("optional") and weight.get("aliases"):
            del weight["aliases"]
            changed = True
    return changed
