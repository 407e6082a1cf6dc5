"""Pipelines shipped with tristage (`tristage pipeline --preset NAME`): demo.yaml, text.yaml, gpu-0.5b.yaml."""
