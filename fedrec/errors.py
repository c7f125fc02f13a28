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
