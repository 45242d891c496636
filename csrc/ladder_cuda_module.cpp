// CUDA build of the ladder projection: registers the CUDA implementations of the ops
// that vpeft_kernels._C defines (import _C first), and the Python module
// vpeft_kernels._C_cuda, which records the versions it was built with.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "build_info.h"
#include "ladder.h"

namespace vpeft {

const LadderPrims& cuda_prims();  // ladder_cuda.cu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    at::TensorList z, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
    const at::Tensor& w_proj, const at::Tensor& b_proj, bool post, double eps) {
  TORCH_CHECK(!z.empty(), "ladder_projection: z is an empty list");
  const c10::cuda::CUDAGuard guard(z[0].device());
  return ladder_forward(cuda_prims(), z, ln_weight, ln_bias, w_proj, b_proj, post, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, at::TensorList z, const at::Tensor& ln_weight,
    const at::Tensor& ln_bias, const at::Tensor& w_proj, const at::Tensor& b_proj,
    const at::Tensor& mean, const at::Tensor& rstd, bool post, double eps, bool input_grad) {
  TORCH_CHECK(!z.empty(), "ladder_projection: z is an empty list");
  const c10::cuda::CUDAGuard guard(z[0].device());
  return ladder_backward(cuda_prims(), grad_out, z, ln_weight, ln_bias, w_proj, b_proj, mean,
                         rstd, post, eps, input_grad);
}

}  // namespace
}  // namespace vpeft

TORCH_LIBRARY_IMPL(vpeft_ext, CUDA, m) {
  m.impl("ladder_forward", &vpeft::forward_cuda);
  m.impl("ladder_backward", &vpeft::backward_cuda);
}

static PyObject* vpeft_cuda_build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString(VPEFT_BUILD_INFO_JSON);
}

static PyObject* vpeft_cudart_version(PyObject*, PyObject*) {
  return PyLong_FromLong(static_cast<long>(CUDART_VERSION));
}

static PyMethodDef vpeft_cuda_methods[] = {
    {"build_info", vpeft_cuda_build_info, METH_NOARGS,
     "JSON: the torch and CUDA versions this extension was compiled against."},
    {"cudart_version", vpeft_cudart_version, METH_NOARGS,
     "CUDART_VERSION of the CUDA headers the kernels were compiled with."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef vpeft_cuda_module = {
    PyModuleDef_HEAD_INIT, "_C_cuda",
    "vpeft ladder projection, CUDA kernels (registered into torch.ops.vpeft_ext)", -1,
    vpeft_cuda_methods};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&vpeft_cuda_module); }
