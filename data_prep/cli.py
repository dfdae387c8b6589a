"""``megatron-cpt prep``: data preparation subcommands (classifier, filter, tokenize, stats)."""
from __future__ import annotations


def register(sub, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    prep_sub = parser.add_subparsers(dest="prep_cmd", metavar="CMD", required=True)
    del prep_sub  # subcommands are added by the data preparation issue
