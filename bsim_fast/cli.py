"""What the project's command lines share: an argument error is one line and exit 2, like every other error, and
the program is named as it was started.

    parser = cli.ArgumentParser(description=...)  # argparse's, with error() and prog below
"""

from __future__ import annotations

import argparse
import os
import sys


def program_name() -> str:
    """`python -m bsim_fast.train` when run so, else the command's own name (bsim-train, write_ffcv.py)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else os.path.basename(sys.argv[0])


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose argument error is one line, `PROG: error: MESSAGE (see --help)`, exit 2, instead
    of the usage block above the error; --help is argparse's. Sub-commands get the same class."""

    def __init__(self, *args, **kwargs):
        if not args:
            kwargs.setdefault("prog", program_name())
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
