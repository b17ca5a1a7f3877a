// What the CPU kernel sources need from torch, without <torch/extension.h>: that header brings the whole C++
// frontend and pybind11 (about 22 s of compile per source file on a 2-core machine); tensors, the three
// factories used here, TORCH_CHECK and at::parallel_for come from ATen's own headers in about 2 s. Only
// cpu_module.cpp, which binds the functions to Python, includes a torch Python header (torch/python.h).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
