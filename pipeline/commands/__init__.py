"""Sub-commands of run_pipeline.py that drive the stage graph (run, edge, server)."""
