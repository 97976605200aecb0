"""The ``cpu`` backend (alias ``cpp``): host-side checks, then the fp32 AVX2/FMA kernels of ``fastclip._C`` (csrc/).

Every op has the signature of its reference in fastclip/ref.py. A call runs the C++ kernel when all
tensors are float32, strided, on the CPU, no gradient is being recorded for them (the kernels have no
backward) and ``upcast`` is False; anything else -- bf16/fp16, autograd, meta tensors, empty inputs --
runs the reference op, so results never depend on the path. Inner dims must have unit stride; a
tensor that does not is made contiguous here. Outer strides are passed to the kernels, so views such as
q/k/v of a packed qkv tensor or the class-token rows ``x[:, 0]`` are read in place. The kernels run on
torch's own OpenMP thread pool (see csrc/common.h), so ``torch.set_num_threads`` governs them too.

``linear`` and ``linear_act`` (fastclip/backends/cpu/linear.py) run on pre-packed weights: the AVX-512 kernel of
csrc/linear.cpp for small batches, MKL's packed GEMM for large ones.

Importing this module fails with ImportError when ``fastclip._C`` is not built or the CPU lacks
AVX2/FMA; ``backend="auto"`` then falls back to the reference ops (fastclip/backends/dispatch.py).
"""
