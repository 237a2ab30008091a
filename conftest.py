"""Root conftest: enable the toolkit's pytest plugin (fixtures for real and fake Redis)."""

pytest_plugins = ["app.testing.plugin"]
