"""The `mergekit-wudi` command: `methods`, `run` and `report`. No math here.

`run` is mergekit-yaml's own click command (its parameters and callback), with the
methods registered first. `methods` prints each method's MergeMethodSpec. `report`
calls mergekit_wudi.report.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any, List, Optional

import click

from mergekit_wudi import __version__
from mergekit_wudi.config_error import ConfigError

_MAIN_EPILOG = """\b
Examples:
  mergekit-wudi methods                     # parameters, types, defaults of each method
  mergekit-wudi methods --format json
  mergekit-wudi run merge.yml ./merged --cuda   # = mergekit-yaml, registration done explicitly
  mergekit-wudi report merge.yml --out ./report --filter 'layers\\.0\\.'
"""


class _Main(click.Group):
    """Builds `run` on first use, so `methods` and `--version` do not import transformers."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted([*super().list_commands(ctx), "run"])

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name == "run":
            return _run_command()
        return super().get_command(ctx, name)


@click.group(cls=_Main, epilog=_MAIN_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-wudi")
def main() -> None:
    """mergekit-wudi: data-free merge methods for mergekit.

    Installing the package registers its merge methods (`mergekit-wudi methods` lists
    them) with mergekit, so the plain `mergekit-yaml` runs them. This command lists them, runs a
    merge where automatic registration is off (MERGEKIT_WUDI_NO_AUTOLOAD=1), and
    reports how much a solved merge lowers the interference loss.
    """


# --- methods -------------------------------------------------------------------------


@main.command(
    epilog="""\b
Examples:
  mergekit-wudi methods
  mergekit-wudi methods doge
  mergekit-wudi methods --format markdown > METHODS.md
"""
)
@click.argument("names", nargs=-1, metavar="[METHOD]...")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "markdown", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)
def methods(names: tuple, output_format: str) -> None:
    """List the merge methods and their YAML parameters (from each method's spec)."""
    from mergekit_wudi.adapter import MERGE_METHODS
    from mergekit_wudi.registration import register

    register(strict=False)

    known = {method.method_name: method for method in MERGE_METHODS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}; choose from {', '.join(known)}", param_hint="METHOD")
    selected = [known[name] for name in names] if names else list(known.values())
    described = [_describe(method.spec) for method in selected]
    if output_format == "json":
        click.echo(json.dumps(described, indent=2))
    elif output_format == "markdown":
        click.echo("\n".join(_markdown(item) for item in described))
    else:
        click.echo("\n".join(_text(item) for item in described))


def _describe(spec) -> dict:
    from mergekit_wudi.spec import parameter_role

    own, passthrough = [], []
    for parameter in spec.parameters:
        role = parameter_role(parameter)
        if role == "lookalike":
            continue
        if role == "passthrough":
            passthrough.append(parameter.name)
            continue
        own.append(
            {
                "name": parameter.name,
                "scope": "per-model" if parameter.scope.value != "shared" else "shared",
                "type": _type_name(parameter.value_type),
                "default": None if parameter.required else parameter.default,
                "required": parameter.required,
                "description": parameter.description or "",
            }
        )
    return {
        "name": spec.name,
        "pretty_name": spec.pretty_name,
        "reference_url": spec.reference_url,
        "parameters": own,
        "fallback_parameters": sorted(passthrough),
    }


def _type_name(value_type: Any) -> str:
    """`Annotated[Optional[float], ...]` -> 'float or null'."""
    origin = typing.get_origin(value_type)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(value_type)[0])
    if origin is typing.Union:
        names = [_type_name(arg) for arg in typing.get_args(value_type) if arg is not type(None)]
        optional = type(None) in typing.get_args(value_type)
        return " | ".join(names) + (" or null" if optional else "")
    if value_type is typing.Any:
        return "any"
    return getattr(value_type, "__name__", str(value_type))


def _default_text(item: dict) -> str:
    if item["required"]:
        return "(required)"
    default = item["default"]
    return "unset" if default is None else json.dumps(default)


def _passthrough_line(item: dict) -> str:
    names = item["fallback_parameters"]
    if not names:
        return ""
    return (
        f"Also accepted, and passed to the fallback method: the parameters of the other registered methods "
        f"({len(names)}: {', '.join(names)})."
    )


def _text(item: dict) -> str:
    lines = [f"{item['name']}: {item['pretty_name']}", f"  {item['reference_url']}"]
    rows = [("parameter", "scope", "type", "default", "meaning")]
    rows += [(p["name"], p["scope"], p["type"], _default_text(p), p["description"]) for p in item["parameters"]]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    if item["fallback_parameters"]:
        lines += ["  " + line for line in _wrap(_passthrough_line(item), 100)]
    return "\n".join(lines) + "\n"


def _markdown(item: dict) -> str:
    lines = [
        f"### `{item['name']}`: [{item['pretty_name']}]({item['reference_url']})",
        "",
        "| parameter | scope | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for p in item["parameters"]:
        cells = (f"`{p['name']}`", p["scope"], p["type"], _default_text(p), p["description"])
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if item["fallback_parameters"]:
        lines += ["", _passthrough_line(item)]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> List[str]:
    import textwrap

    return textwrap.wrap(text, width)


# --- run -------------------------------------------------------------------------------


def _run_command() -> click.Command:
    """mergekit-yaml's command under the name `run`: same options, same callback, plus register()."""
    from mergekit.options import PrettyPrintHelp
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    def callback(**kwargs: Any) -> None:
        from mergekit_wudi.registration import register

        try:
            register()
        except RuntimeError as error:  # a method name taken by another package
            raise click.ClickException(str(error)) from None
        _validate_config(kwargs["config_file"])
        try:
            mergekit_yaml.callback(**kwargs)
        except ConfigError as error:  # one line, also where the autoload's excepthook is off
            raise click.ClickException(str(error)) from None

    # mergekit's parameters as they are, except that a missing CONFIG_FILE is a usage error, not a traceback.
    config_file = click.Argument(["config_file"], type=click.Path(exists=True, dir_okay=False))
    params = [config_file if param.name == "config_file" else param for param in mergekit_yaml.params]
    return PrettyPrintHelp(
        "run",
        params=params,
        callback=callback,
        help="Run a merge exactly as `mergekit-yaml CONFIG_FILE OUT_PATH [OPTIONS]` does, after registering "
        "this package's methods (for environments where automatic registration is off, e.g. "
        "MERGEKIT_WUDI_NO_AUTOLOAD=1). Every mergekit-yaml option works the same way.",
        short_help="Run mergekit-yaml with the methods registered.",
        epilog="""\b
Examples:
  mergekit-wudi run merge.yml ./merged
  mergekit-wudi run merge.yml ./merged --cuda --lazy-unpickle -v
  MERGEKIT_WUDI_NO_AUTOLOAD=1 mergekit-wudi run merge.yml ./merged --no-copy-tokenizer
""",
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _validate_config(path: str) -> None:
    """Fail with one line, before mergekit starts, on a config mergekit would reject."""
    from mergekit_wudi.config_check import check_merge_method, load_config

    try:
        check_merge_method(load_config(path), path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


# --- report ------------------------------------------------------------------------------


@main.command(
    epilog="""\b
Examples:
  mergekit-wudi report merge.yml                       # ./wudi-report/report.md, report.csv, plots/
  mergekit-wudi report merge.yml --out rep --filter 'layers\\.(0|1)\\.' --max-tensors 20
  mergekit-wudi report merge.yml --device cuda --no-plots --no-ranks

\b
Support: everything mergekit resolves (per-model weight, gradients, filters, slices,
solve filters, model+lora) is used as in the merge; vocabulary tensors, non-linear
tensors and tensors sent to the fallback are not reported.
"""
)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="wudi-report", show_default=True,
              help="Directory for report.md, report.csv and plots/.")
@click.option("--filter", "name_filter", default=None, help="Regular expression searched in tensor names.")
@click.option("--max-tensors", type=click.IntRange(min=1), default=None, help="Stop after this many tensors.")
@click.option("--device", default="cpu", show_default=True, help="Device to solve on (cpu, cuda, cuda:1...).")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write a PNG per layer (needs matplotlib).")
@click.option("--ranks/--no-ranks", default=True, show_default=True,
              help="Compute effective ranks (one SVD per task vector) and input/output overlaps.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False, show_default=True,
              help="Trust remote code when reading model configs (danger).")
@click.option("--lora-merge-cache", default=None, help="Where model+lora merges are stored.")
@click.option("--transformers-cache", default=None, help="Override storage path for downloaded models.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def report(
    config_file: str,
    out_dir: str,
    name_filter: Optional[str],
    max_tensors: Optional[int],
    device: str,
    plots: bool,
    ranks: bool,
    trust_remote_code: bool,
    lora_merge_cache: Optional[str],
    transformers_cache: Optional[str],
    quiet: bool,
) -> None:
    """Interference loss of task arithmetic vs the solved merge, per linear tensor.

    Reads CONFIG_FILE (a mergekit YAML with one of our merge methods),
    solves every linear weight as the merge would, reading one tensor of each model
    at a time, and writes report.md, report.csv and one PNG per layer.
    """
    import re

    import tqdm
    from mergekit.options import MergeOptions

    from mergekit_wudi import report as reporting
    from mergekit_wudi.config_check import load_config

    if name_filter:
        try:
            re.compile(name_filter)
        except re.error as error:
            raise click.BadParameter(f"not a regular expression: {error}", param_hint="--filter") from None
    try:
        config = load_config(config_file)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "plots need matplotlib: pip install 'mergekit-wudi[report]', or pass --no-plots"
            ) from None
    options = MergeOptions(
        quiet=quiet,
        trust_remote_code=trust_remote_code,
        lora_merge_cache=lora_merge_cache,
        transformers_cache=transformers_cache,
        device=device,
    )
    bars = []  # the progress callback runs only while the iterator below is consumed
    try:
        count, iterator = reporting.plan_reports(
            config, options=options, name_filter=name_filter, max_tensors=max_tensors, device=device, ranks=ranks,
            progress=lambda: bars[0].update(),
        )
    except ConfigError as error:
        raise click.ClickException(f"{config_file}: {error}") from None
    except (OSError, RuntimeError, ValueError) as error:
        # Unreadable models, unknown architectures, inconsistent slices: mergekit's own message.
        raise click.ClickException(f"{config_file}: cannot plan the merge: {_one_line(error)}") from None
    with tqdm.tqdm(total=count, desc="Reporting", unit="tensor", disable=quiet) as bar:
        bars.append(bar)
        rows = list(iterator)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reporting.write_csv(rows, out / "report.csv")
    reporting.write_markdown(rows, out / "report.md", method=config.merge_method, config_path=config_file)
    written = reporting.write_plots(rows, out / "plots") if plots and rows else []
    click.echo(
        f"{len(rows)} tensors -> {os.path.join(out_dir, 'report.md')}, report.csv"
        + (f", {len(written)} plots in {os.path.join(out_dir, 'plots')}" if written else "")
    )


if __name__ == "__main__":
    main()
