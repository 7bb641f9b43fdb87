// Placeholder: being written.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_fused_step(py::module_& m) {}
