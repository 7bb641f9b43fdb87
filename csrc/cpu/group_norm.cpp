// Placeholder: being written.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_group_norm(py::module_& m) {}
