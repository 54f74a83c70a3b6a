"""The live registry: MQTT ingest, the in-memory agent records, their persistence."""
