"""Language models: loading any source (preset, GGUF, local folder, hub id, random:),
capturing layers, the extract stage and the layer sample."""
