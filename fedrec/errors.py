"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class FedRecError(Exception):
    """Base class for errors caused by the user's input (config, data files)."""


class ConfigError(FedRecError):
    """An experiment YAML (or --set override) is invalid."""


class DataFormatError(FedRecError):
    """A data file is missing or malformed.

    The message names the file, the line (when there is one) and the expected format.
    """

    def __init__(self, path, message, line=None, expected=None):
        where = f"{path}" if line is None else f"{path}:{line}"
        text = f"{where}: {message}"
        if expected:
            text += f" (expected: {expected})"
        super().__init__(text)
        self.path = str(path)
        self.line = line
        self.expected = expected


def run_script(main, prog: str):
    """A script's entry point (benchmarks/, scripts/): a FedRecError (a bad YAML, a missing
    data file, a grid where one run is expected) is one line on stderr and exit code 2, as
    in the `fedrec` CLI, not a traceback."""
    import sys

    try:
        code = main()
    except FedRecError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
