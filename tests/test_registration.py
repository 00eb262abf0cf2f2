"""Automatic registration: the .pth hook, idempotence, the off switch, name conflicts."""

import os
import subprocess
import sys

import pytest
from registry import METHODS

# Prints the spec names of our methods as the mergekit registry gives them.
PRINT_REGISTERED = f"print([registry.get(n).spec.name for n in {list(METHODS)!r}])"


def python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MERGEKIT_WUDI_NO_AUTOLOAD"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)


def test_plain_import_of_mergekit_sees_the_methods_and_startup_stays_light():
    result = python(
        "import sys; light = 'torch' not in sys.modules and 'mergekit' not in sys.modules\n"
        "from mergekit.merge_methods import registry\n"
        "print(light)\n" + PRINT_REGISTERED
    )
    assert result.stdout.strip().splitlines() == ["True", repr(list(METHODS))], result.stderr


def test_environment_variable_turns_autoload_off_and_register_is_idempotent():
    result = python(
        "from mergekit.merge_methods import registry\n"
        "names = [m.spec.name for m in registry.registered_methods()]\n"
        "import mergekit_wudi\n"
        "print('wudi' in names, mergekit_wudi.register(), mergekit_wudi.register())",
        MERGEKIT_WUDI_NO_AUTOLOAD="1",
    )
    assert result.stdout.strip() == f"False {METHODS!r} ()", result.stderr


def test_a_name_taken_by_another_method_is_reported_not_overwritten():
    code = (
        "from mergekit.merge_methods import registry\n"
        "from mergekit.merge_methods.registry import _METHODS\n"
        "impostor = _METHODS.pop('task_arithmetic')\n"
        "from dataclasses import replace\n"
        "_METHODS['wudi'] = replace(impostor, method_name='wudi')\n"
        "import mergekit_wudi\n"
        "try:\n"
        "    mergekit_wudi.register()\n"
        "except RuntimeError as e:\n"
        "    print('strict:', e)\n"
        "print(mergekit_wudi.register(strict=False), type(registry.get('wudi')).__name__)"
    )
    result = python(code, MERGEKIT_WUDI_NO_AUTOLOAD="1")
    assert "strict: mergekit-wudi: merge method 'wudi' is already registered by" in result.stdout
    others = tuple(name for name in METHODS if name != "wudi")
    assert f"{others!r} GeneralizedTaskArithmeticMerge" in result.stdout
    assert "left in place" in result.stderr  # the warning of the non-strict call


def test_autoload_after_mergekit_was_imported_registers_at_once():
    result = python(
        "from mergekit.merge_methods import registry\n"
        "import mergekit_wudi.registration as r, os\n"
        "del os.environ['MERGEKIT_WUDI_NO_AUTOLOAD']\n"
        "r.autoload(); r.autoload()\n"
        "print(registry.get('doge').spec.pretty_name)",
        MERGEKIT_WUDI_NO_AUTOLOAD="1",
    )
    assert result.stdout.strip() == "DOGE-TA", result.stderr


@pytest.mark.parametrize("value, off", [("1", True), ("true", True), ("0", False), ("", False)])
def test_off_switch_values(monkeypatch, value, off):
    from mergekit_wudi import registration

    monkeypatch.setenv(registration.DISABLE_ENV, value)
    assert registration.autoload_disabled() is off


def test_pth_line_is_silent_when_the_package_cannot_be_imported(tmp_path):
    # A stale .pth (package moved or half-uninstalled) must not print a traceback in
    # every Python process; run its line with site disabled and the package off sys.path
    # (-I: PYTHONPATH ignored too).
    from pathlib import Path

    line = (Path(__file__).parents[1] / "mergekit_wudi.pth").read_text().strip()
    assert line.startswith("import ")  # site.py only executes lines that start with "import"
    code = "import sys; sys.path = [p for p in sys.path if p]; exec(sys.argv[1]); print('ok', 'mergekit_wudi' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, line], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "ok False", "")


@pytest.mark.parametrize(
    "module",
    ["mergekit_wudi.adapter", "mergekit_wudi.spec", "mergekit_wudi.fallback", "mergekit_wudi.config_check",
     "mergekit_wudi.report", "mergekit_wudi.cli", "mergekit_wudi"],
)
def test_importing_one_of_our_modules_first_still_registers(module):
    # The module itself may be what first imports mergekit: registration waits for it.
    result = python(
        f"import sys, {module}\n"
        "from mergekit.merge_methods import registry\n" + PRINT_REGISTERED
    )
    assert result.stdout.strip() == repr(list(METHODS)), result.stderr
    assert "registration failed" not in result.stderr


def test_pyproject_entry_points_equal_the_registry():
    tomllib = pytest.importorskip("tomllib")
    from importlib import import_module
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    entry_points = pyproject["project"]["entry-points"]["mergekit.merge_methods"]
    assert sorted(entry_points) == sorted(METHODS)
    for name, target in entry_points.items():
        module, _, attribute = target.partition(":")
        assert getattr(import_module(module), attribute).method_name == name
