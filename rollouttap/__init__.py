"""rollouttap: capture whole agent conversations as exact token ids, through a mitmproxy addon.

Components live in their own subpackages: ``rollouttap.addon`` (inside mitmdump),
``rollouttap.store`` (the SQLite contract), ``rollouttap.manager`` (runs agents),
``rollouttap.trainer_hooks`` (TRL). This top package stays import-light on purpose.
"""

__version__ = "0.1.0"
