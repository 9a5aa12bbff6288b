"""Chat templates shipped with hermes-worker."""

from importlib import resources

FALLBACK_TEMPLATE_NAME = "hermes4.jinja"
CHATML_TOOLS_TEMPLATE_NAME = "chatml_tools.jinja"


def fallback_template() -> str:
    """The Hermes 4 template used for checkpoints that carry none of their own."""
    return (resources.files(__name__) / FALLBACK_TEMPLATE_NAME).read_text(encoding="utf-8")


def chatml_tools_template() -> str:
    """ChatML with the Hermes tool block: the "tool_use" template of ChatML checkpoints
    whose own template shows no tools (the prepared SmolLM2)."""
    return (resources.files(__name__) / CHATML_TOOLS_TEMPLATE_NAME).read_text(encoding="utf-8")
