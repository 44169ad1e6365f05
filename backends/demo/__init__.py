"""The demo models, built from code (trained and exported here, nothing downloaded)."""
