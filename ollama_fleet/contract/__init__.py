"""The wire contract shared by agent and controller: topics, payloads, job verbs and statuses. Imports nothing of ours outside this package."""
