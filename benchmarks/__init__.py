"""`run_pipeline.py bench`: where split computing wins (rate/accuracy, device cost, latency, entropy coding)."""
