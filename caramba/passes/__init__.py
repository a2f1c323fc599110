"""Graph passes: one per file, named for what they do; the pipeline order lives in pipeline.py."""
