"""strata: an OpenAI-compatible LLM serving daemon."""

__version__ = "0.1.0"
