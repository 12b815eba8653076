"""Serving a built RAG system: an OpenAI-compatible API and a web playground (`rag-serve`)."""
