"""``phi3v-train``: train (the default command), evaluate, merge, and build the tiny preset.

``phi3v-train --data_dir DIR ...`` trains; ``phi3v-train eval|merge|make-tiny ...`` run the other
jobs. Subcommands are imported on first use.
"""

from __future__ import annotations

import sys

import click

from phi3v_data.cli import LazyGroup

SUBCOMMANDS = {
    "train": "phi3v_train.training.train:train_command",
    "eval": "phi3v_train.evaluation.evaluate:eval_command",
    "merge": "phi3v_train.merge:merge_command",
    "make-tiny": "phi3v_train.model.tiny:make_tiny_command",
    "plan": "phi3v_train.planning.plan:plan_command",
}
DEFAULT_COMMAND = "train"


class DefaultLazyGroup(LazyGroup):
    """Runs ``train`` when the first argument is not a subcommand (``phi3v-train --data_dir D``).

    ``phi3v-train --help`` is therefore the training help, which documents every flag and ends
    with the list of the other subcommands.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.lazy_subcommands:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


@click.group(
    cls=DefaultLazyGroup,
    lazy_subcommands=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def group() -> None:
    """Fine-tune Phi-3 / Phi-3.5-vision. Without a subcommand, `train` runs:

    \b
      phi3v-train --data_dir DIR --output_dir OUT [options]
      torchrun --nproc_per_node=N --no-python phi3v-train --data_dir DIR ...
    """


def main(argv: list[str] | None = None) -> None:
    group.main(args=sys.argv[1:] if argv is None else argv, prog_name="phi3v-train")


if __name__ == "__main__":
    main()
