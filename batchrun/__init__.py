"""batchrun: run LLM jobs over tables through Anthropic's Message Batches API."""
__version__ = "0.1.0"
