"""The ``slidepipe`` command: one click group; each command lives in its own module."""

from __future__ import annotations

import click

from service.cli_service import serve, up, worker


@click.group()
@click.version_option(package_name="slidepipe")
def main() -> None:
    """slidepipe: whole-slide histopathology processing, from the command line or as a service."""


main.add_command(serve)
main.add_command(worker)
main.add_command(up)


if __name__ == "__main__":
    main()
