"""The one rich console the CLI and stages print to."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copyable
