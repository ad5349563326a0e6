"""Custom-op plugins for inference engines (LightKV kernels and TensorRT plugin registration)."""
