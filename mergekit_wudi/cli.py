"""The `mergekit-wudi` command (placeholder; see issue 8)."""

import click

from mergekit_wudi import __version__


@click.group()
@click.version_option(__version__, prog_name="mergekit-wudi")
def main() -> None:
    """mergekit-wudi: WUDI-Merging and DOGE for mergekit."""
