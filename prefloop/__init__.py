"""The `prefloop` command line: broker, services, bootstrap, ingest, demo."""
