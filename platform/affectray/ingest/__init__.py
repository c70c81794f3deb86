"""Ingest: source layouts, annotation files and the job that turns them into segment shards."""
