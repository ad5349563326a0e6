"""lightkv_export: compile LVLMs with LightKV vision-token KV-cache compression."""

__version__ = "0.1.0"
