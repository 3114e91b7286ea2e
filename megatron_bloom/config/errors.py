"""The one exception type a bad configuration raises."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the numbers and the fix.

    Entry points catch it and print ``error: <message>`` with exit code 2 and no traceback.
    """
