"""Shared fixtures. Triton runs under its interpreter when no GPU is present: that must be decided before
any Triton kernel is defined, so it is set here, before evolver_kernels is imported by any test."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import evolver_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# (device, backend) pairs under test besides the reference: every backend that runs here.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
KERNEL_CASES = [
    pytest.param(device, backend, id=f"{device}-{backend}")
    for device in DEVICES
    for backend in evolver_kernels.available_backends(device)
    if backend != "reference"
]
CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible: CUDA kernel tests need one")
