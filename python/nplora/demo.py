"""Placeholder replaced by the demo (issue 2)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(run=lambda args: 0)
