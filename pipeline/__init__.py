"""Ladon-style multi-task split computing as a streaming pipeline: stage graph, CLI and shared plumbing."""
