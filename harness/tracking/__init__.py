"""The MLflow record: the store, the writer, liveness (heartbeats, claims), the code version."""
