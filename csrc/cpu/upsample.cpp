// CPU sub-pixel interleave of the fused nearest-×2 upsample + 3×3(×3) convolution (pydiffmed/models/layers.py,
// upsample_conv). The phase convolution writes z, channels-last, B × (n_d+1) × (n_h+1) × (n_w+1) × (P·C): P = 2^dims
// phase blocks of C channels. Output voxel (d, h, w) of phase (a, b, c) = (d & 1, h & 1, w & 1) is the C channels of
// block (a·2 + b)·2 + c at z voxel (d/2 + a, h/2 + b, w/2 + c). out: B × 2n_d × 2n_h × 2n_w × C, channels-last.
//
// A pure copy, C contiguous elements per output voxel. torch runs it as an 8-D strided copy whose inner run is one
// voxel's channels; here each thread takes whole output rows and copies voxel runs with a fixed-size memcpy for the
// common run lengths, so the copy is bound by memory rather than by index arithmetic.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace py = pybind11;

namespace {

struct Geometry {
    int64_t batch, out_depth, out_height, out_width;
    int64_t run;          // bytes of one output voxel: C · element size
    int64_t z_voxel, z_row, z_slice, z_sample;  // byte strides of z
    bool three_d;
};

template <int64_t Run>
inline void copy_run(char* dst, const char* src, int64_t run) {
    if constexpr (Run > 0) {
        std::memcpy(dst, src, Run);
    } else {
        std::memcpy(dst, src, run);
    }
}

template <int64_t Run>
void interleave_rows(const Geometry& g, const char* z, char* out, int num_threads) {
    const int64_t rows = g.batch * g.out_depth * g.out_height;
    const int64_t out_row = g.out_width * g.run;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = r % g.out_height, d = (r / g.out_height) % g.out_depth, b = r / (g.out_height * g.out_depth);
        const int64_t a = g.three_d ? (d & 1) : 0, zd = g.three_d ? (d >> 1) + a : 0;
        const int64_t pb = h & 1, zh = (h >> 1) + pb;
        const char* even = z + b * g.z_sample + zd * g.z_slice + zh * g.z_row + (a * 2 + pb) * 2 * g.run;
        const char* odd = even + g.z_voxel + g.run;  // phase c = 1 reads the next z voxel, the next block
        char* dst = out + r * out_row;
        for (int64_t x = 0; x < g.out_width; x += 2) {
            const int64_t offset = (x >> 1) * g.z_voxel;
            copy_run<Run>(dst + x * g.run, even + offset, g.run);
            copy_run<Run>(dst + (x + 1) * g.run, odd + offset, g.run);
        }
    }
}

void subpixel_interleave(std::uintptr_t z_ptr, std::uintptr_t out_ptr, int64_t element_size, int64_t batch,
                         int64_t low_depth, int64_t low_height, int64_t low_width, int64_t channels, bool three_d,
                         int num_threads) {
    if (batch < 0 || low_depth < 0 || low_height < 0 || low_width < 0 || channels < 1)
        throw std::invalid_argument("subpixel_interleave: sizes must be non-negative and channels >= 1");
    if (element_size != 2 && element_size != 4)
        throw std::invalid_argument("subpixel_interleave: element_size must be 2 or 4 bytes");
    if (!three_d && low_depth != 1)
        throw std::invalid_argument("subpixel_interleave: 2-D input has low_depth 1");
    Geometry g;
    g.three_d = three_d;
    g.batch = batch;
    g.out_depth = three_d ? 2 * low_depth : 1;
    g.out_height = 2 * low_height;
    g.out_width = 2 * low_width;
    g.run = channels * element_size;
    g.z_voxel = (three_d ? 8 : 4) * g.run;
    g.z_row = (low_width + 1) * g.z_voxel;
    g.z_slice = (low_height + 1) * g.z_row;
    g.z_sample = (three_d ? low_depth + 1 : 1) * g.z_slice;
    if (g.batch * g.out_depth * g.out_height * g.out_width == 0) return;
    if (!z_ptr || !out_ptr) throw std::invalid_argument("subpixel_interleave: pointers must be non-null");
    const char* z = reinterpret_cast<const char*>(z_ptr);
    char* out = reinterpret_cast<char*>(out_ptr);
    num_threads = std::max(1, num_threads);
    py::gil_scoped_release no_gil;
    switch (g.run) {
        case 64: interleave_rows<64>(g, z, out, num_threads); break;
        case 128: interleave_rows<128>(g, z, out, num_threads); break;
        case 256: interleave_rows<256>(g, z, out, num_threads); break;
        case 512: interleave_rows<512>(g, z, out, num_threads); break;
        default: interleave_rows<0>(g, z, out, num_threads);
    }
}

}  // namespace

void register_upsample(py::module_& m) {
    m.def("subpixel_interleave", &subpixel_interleave, py::arg("z"), py::arg("out"), py::arg("element_size"),
          py::arg("batch"), py::arg("low_depth"), py::arg("low_height"), py::arg("low_width"), py::arg("channels"),
          py::arg("three_d"), py::arg("num_threads"),
          "Interleave the 2^dims phase blocks of z (channels-last) into the ×2 upsampled channels-last out.");
}
