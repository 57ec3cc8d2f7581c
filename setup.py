"""Optional ahead-of-time build of the CUDA kernels in csrc/ (metadata lives in pyproject.toml).

A plain `pip install -e .` builds nothing here. On a cluster with nvcc and a CUDA build of torch:

    NESTLM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" pip install --no-build-isolation -e .

compiles nestlm/_memory_scan_C*.so (it registers torch.ops.nestlm_csrc.*), which nestlm.ops.memory.csrc
loads with torch.ops.load_library before trying a JIT build.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("NESTLM_BUILD_CUDA", "") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [
        CUDAExtension(
            "nestlm._memory_scan_C",
            sources=["csrc/memory_scan_bind.cpp", "csrc/memory_scan_fwd.cu", "csrc/memory_scan_bwd.cu"],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
