// The extensions' Python face, through pybind11 (bundled with torch). Importing a module runs its
// TORCH_LIBRARY registrations; the module itself says what it was compiled with: build_record() (torch, CUDA,
// architectures, flags, the sources' hash: written by the build into evolver_build_record.h, see
// evolver_kernels/kernels/jit.py), openmp (the _OPENMP version, 0 without OpenMP) and compiler.
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "evolver_build_record.h"  // generated per build, in a folder of its own (not in csrc/)

namespace evolver_kernels {

// The marker lets the stale-build check read the record from the binary without loading it (jit.py reads the
// bytes after it up to the NUL); build_record() returns the whole string so the linker keeps all of it.
__attribute__((used)) static const char kBuildRecord[] = "EVOLVER_KERNELS_BUILD_RECORD=" EVOLVER_KERNELS_BUILD_RECORD;

inline void describe_build(pybind11::module_& m) {
  m.doc() = "evolver-kernels compiled kernels: the ops are registered as torch.ops.evolver_kernels.*";
  m.def("build_record", [] { return std::string(kBuildRecord); },
        "what this module was built against: the marker, then a JSON object");
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
  m.attr("compiler") = __VERSION__;
}

}  // namespace evolver_kernels
