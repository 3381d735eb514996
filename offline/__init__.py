"""Offline build: the only writer of artifacts/ and model_repository/."""
