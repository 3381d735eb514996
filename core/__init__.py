"""The domain of FusionRec, free of protobuf and gRPC: item/query/candidate types, the feature spec,
limits, and the pipeline components (channels, filters, merge, diversity re-ranker, ALS fold-in).
Services and the offline build both import it; it imports neither of them."""
