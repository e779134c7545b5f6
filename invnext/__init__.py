"""invnext: fast, dependable pretraining and use of InternVideo-Next video encoders.

``invnext.ops`` holds the fused ops (masks, token gather/scatter, masked attention,
diffusion-decoder steps), each with a pure-PyTorch reference and Triton / CUDA backends.
Importing invnext touches no GPU and compiles nothing.
"""
__version__ = "0.1.0"
