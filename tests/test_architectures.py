"""architectures.py: the repaired BertModel definition (the merges themselves: test_bert.py)."""


def test_register_architectures_is_idempotent():
    from mergekit.architecture.json_definitions import NAME_TO_ARCH

    from mergekit_wudi.architectures import register_architectures

    register_architectures()
    before = len(NAME_TO_ARCH["BertModel"])
    assert register_architectures() == ()
    assert len(NAME_TO_ARCH["BertModel"]) == before
    repaired = NAME_TO_ARCH["BertModel"][0].modules["default"].architecture.definition
    optional = [w for w in repaired.pre_weights if w.optional]
    assert optional and all(not w.aliases for w in optional)
    # mergekit's own definition stays behind it, unchanged
    assert any(w.aliases for d in NAME_TO_ARCH["BertModel"][1:] for w in d.modules["default"].architecture.definition.pre_weights if w.optional)
