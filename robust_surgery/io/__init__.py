"""Reading and writing models: architecture specs, checkpoints, the safetensors+manifest format, the zoo."""
