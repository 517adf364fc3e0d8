"""``phi3v-data``: validate, convert and synthesize datasets.

Subcommands live in their own modules and are imported only when called, so ``validate`` does not
pay for OpenCV and ``--help`` stays instant.
"""

from __future__ import annotations

import importlib

import click

from phi3v_data.safe_io import UnsafePath, describe_os_error

#: subcommand name -> "module:attribute" of its click command
SUBCOMMANDS = {
    "validate": "phi3v_data.validate:validate_command",
    "convert": "phi3v_data.convert:convert_command",
    "synth": "phi3v_data.synth:synth_command",
    "preview": "phi3v_data.preview:preview_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args, lazy_subcommands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_subcommands:
            module_name, attribute = self.lazy_subcommands[name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        """The last net under every subcommand: an OS error or an unsafe path that no command
        reported itself becomes one line and exit 1, Ctrl-C exit 130, never a traceback."""
        try:
            return super().invoke(ctx)
        except OSError as error:
            raise click.ClickException(describe_os_error(error)) from None
        except UnsafePath as error:
            raise click.ClickException(str(error)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(
    cls=LazyGroup,
    lazy_subcommands=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(package_name="phi3v")
def main() -> None:
    """Datasets for Phi-3 / Phi-3.5-vision fine-tuning in the conversations-jsonl format."""
