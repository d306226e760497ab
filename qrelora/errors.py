"""What can stop a command, and the exit code each gives (`qrelora` maps them in one place: cli.main).

    0   done, or nothing to do (a finished run run again)
    1   anything else, e.g. a run that diverged
    2   bad input: a recipe, override, path, data set, tokenizer or checkpoint that cannot be used, or a run
        directory in use; nothing was trained or written
    3   `qrelora memory`: the recipe does not fit the memory budget
    130 interrupted (Ctrl-C or SIGTERM) after saving a checkpoint
"""

from __future__ import annotations

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class QreloraError(Exception):
    """An outcome the command line reports in one paragraph (no traceback) with its exit code."""

    exit_code = EXIT_ERROR


class BadInput(QreloraError):
    """Input the user must fix; the message names what and how. Nothing was trained or written."""

    exit_code = EXIT_BAD_INPUT
