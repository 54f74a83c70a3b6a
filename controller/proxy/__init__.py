"""The proxy: routing LLM requests to an agent's Ollama, the upstream pool, the request log, API keys."""
