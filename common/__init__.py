"""Service plumbing shared by the services and the offline build: config, artifact manifest, components
loaded from an artifact set, proto <-> core conversions, server bootstrap, metrics, logs, hot swap."""
