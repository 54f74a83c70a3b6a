"""The server-rendered dashboard: pages, live sections over SSE, login sessions."""
