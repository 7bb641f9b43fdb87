// pydiffmed._C: the CPU kernels. Each csrc/cpu/<op>.cpp defines register_<op>(module); Python passes raw
// pointers, sizes and dtype codes after validating every argument (pydiffmed/ops/*.py).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_attention(py::module_& m);
void register_group_norm(py::module_& m);
void register_fused_step(py::module_& m);
void register_upsample(py::module_& m);

PYBIND11_MODULE(_C, m) {
    m.doc() = "pydiffmed CPU kernels (OpenMP, AVX2/AVX-512 dispatch at run time)";
    register_attention(m);
    register_group_norm(m);
    register_fused_step(m);
    register_upsample(m);
}
