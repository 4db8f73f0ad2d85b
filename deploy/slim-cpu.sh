#!/bin/sh
# deploy/slim-cpu.sh SITE_PACKAGES: on a CPU base (no CUDA_VERSION, which NVIDIA's CUDA images
# set), delete the CUDA libraries that a job never loads there. torch 2.14.1 has no CPU wheel on
# PyPI: its wheel links libtorch_cuda.so against the CUDA runtime libraries, so `import torch`
# needs those, and they stay. What goes was measured (/proc/self/maps of a CPU job: import
# torch, train, ONNX export and ONNX Runtime): libraries that are only ever dlopen'ed on a GPU
# (cuDNN's engine libraries, the CUDA linear algebra of torch, ONNX Runtime's CUDA and TensorRT
# providers, NVRTC's alternate build, multi-GPU cuSOLVER, the profilers' nvperf and CUPTI
# copies). The Dockerfile runs it in the same step as the install: a later layer could hide
# files, not shrink the image.
set -eu
if [ -n "${CUDA_VERSION:-}" ]; then
    echo "slim-cpu: CUDA base image (CUDA_VERSION=$CUDA_VERSION): every library kept"
    exit 0
fi
cd "$1"
before=$(du -sm . | cut -f1)
rm -rf nvidia/cudnn/lib/libcudnn_*.so.9 \
    nvidia/cu13/lib/libnvrtc.alt.so.* nvidia/cu13/lib/libnvrtc-builtins.alt.so.* \
    nvidia/cu13/lib/libcusolverMg.so.* nvidia/cu13/lib/libnvperf_*.so \
    torch/lib/libtorch_cuda_linalg.so \
    onnxruntime/capi/libonnxruntime_providers_cuda.so \
    onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
    triton/backends/nvidia/lib/cupti triton/backends/nvidia/lib/cupti-blackwell \
    triton/instrumentation/libGPUInstrumentationTestLib.so
echo "slim-cpu: site-packages ${before} MB -> $(du -sm . | cut -f1) MB"
