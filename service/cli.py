"""The ``slidepipe`` command: one click group; each command lives in its own module.

Engine commands (``run``, ``heatmap``, ``models``, ``demo``) are in ``service.cli_engine``;
service commands (``serve``, ``worker``, ``up``) are in ``service.cli_service``;
``train`` is in ``service.cli_train``.
"""

from __future__ import annotations

import click

from service.cli_engine import COMMANDS as ENGINE_COMMANDS
from service.cli_engine import setup_logging
from service.cli_outputs import COMMANDS as OUTPUT_COMMANDS
from service.cli_service import serve, up, worker
from service.cli_stain import train_cyclegan
from service.cli_tissue import COMMANDS as TISSUE_COMMANDS
from service.cli_train import COMMANDS as TRAIN_COMMANDS
from service.cli_train import train_group


@click.group()
@click.version_option(package_name="slidepipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """slidepipe: whole-slide histopathology processing, from the command line or as a service."""
    setup_logging(verbose)


train_group.add_command(train_cyclegan)  # train cyclegan (service.cli_stain)
for _command in (*ENGINE_COMMANDS, *TISSUE_COMMANDS, *TRAIN_COMMANDS, *OUTPUT_COMMANDS,
                 serve, worker, up):
    main.add_command(_command)


if __name__ == "__main__":
    main()
