// uae_fast._topk: exact inner-product top-k for retrieval serving (filled by the retrieval issue).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

PYBIND11_MODULE(_topk, m) {
    m.doc() = "Exact top-k retrieval kernels for uae_fast";
    m.def("max_threads", &max_threads, "Threads the search kernels use (OpenMP), 1 without OpenMP");
}
