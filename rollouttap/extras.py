"""Optional dependencies: which extra installs each, and one clear error when a command lacks one."""

from __future__ import annotations

import importlib.util

from rollouttap.errors import MissingDependencyError

# pyproject.toml's extras, by the module a command imports.
EXTRA_OF = {
    "torch": "train", "transformers": "train", "trl": "train", "tokenizers": "train", "datasets": "train",
    "openai": "train", "aiohttp": "test", "pytest": "test", "vllm": "vllm",
}


def missing_message(what: str, modules: list[str]) -> str:
    """What to say when ``what`` lacks ``modules``: them, and the pip command that installs their extras."""
    extras = ",".join(sorted({EXTRA_OF.get(m, "train") for m in modules}))
    return f"{what} needs {', '.join(modules)}, not installed here: pip install 'rollouttap[{extras}]'"


def require(what: str, *modules: str) -> None:
    """Raise MissingDependencyError naming the extra to install when any of ``modules`` is not importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(missing_message(what, missing))
