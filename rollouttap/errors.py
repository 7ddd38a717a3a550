"""The exception family callers catch. Every component raises these, wrapping third-party errors."""


class RolloutTapError(Exception):
    """Base of every error rollouttap raises on purpose."""


class StoreError(RolloutTapError):
    """The SQLite store cannot be opened, read or written."""


class StoreVersionError(StoreError):
    """The store file was written by another schema version."""


class ProxyError(RolloutTapError):
    """The capture proxy could not be started, reached or kept alive."""


class AgentSpecError(RolloutTapError):
    """An agent specification (command template or entry point) is invalid."""


class ConfigError(RolloutTapError):
    """A setting has a value that cannot work."""


class NotFoundError(ConfigError):
    """An agent, run or flow the caller named is not in the store."""


class MissingDependencyError(ConfigError):
    """A command needs a package that an optional extra (``rollouttap[train]``, ...) installs."""
