"""The served models beside their exporter: the fused ranker module, the Triton python models,
the config.pbtxt writer and the exporter that writes model_repository/ (offline is its only writer)."""
