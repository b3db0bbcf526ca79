"""The one error a user's setting raises (below every rule module, so each can raise it)."""


class ConfigError(ValueError):
    """A setting the user can fix; the message names the key and what would be valid."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
