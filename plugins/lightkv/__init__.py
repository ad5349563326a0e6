"""LightKVMerge on GPUs: Triton kernels, ahead-of-time compilation and the TensorRT plugin."""
