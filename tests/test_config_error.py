"""config_error.py: ConfigError and the excepthook that prints it as one line."""

from mergekit_wudi.config_error import ConfigError


def test_excepthook_prints_config_errors_as_one_line_and_chains_the_rest(monkeypatch, capsys):
    import sys

    from mergekit_wudi.config_error import install_excepthook

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args[0]))
    install_excepthook()
    install_excepthook()  # idempotent: one wrapper, not two
    sys.excepthook(ConfigError, ConfigError("set lr > 0"), None)
    sys.excepthook(KeyError, KeyError("x"), None)
    assert capsys.readouterr().err == "error: set lr > 0\n"
    assert seen == [KeyError]


def test_config_error_is_a_runtime_error_so_pydantic_passes_it_through():
    assert issubclass(ConfigError, RuntimeError) and not issubclass(ConfigError, ValueError)
