"""Cloud ingest and decoder service: MQTT (shared subscription) and gRPC ingest, validation, dedupe,
batched decoding, durable output store, metrics and security helpers. See docs/deploy-cloud.md."""
