"""argparse help that states every option's default."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to each option's help, except where the default is None or the
    help already names it ("(default: ...)"): there the help text says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "(default:" in text:
            return text
        return super()._get_help_string(action)
