"""Meshes, logical-axis rules and placement. Imports nothing from llmjax."""
