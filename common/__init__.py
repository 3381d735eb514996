"""Shared pieces of FusionRec: config, artifact manifest, feature spec, server bootstrap, metrics."""
