// CPU backend entry point of the fused merge (no torch types: the op layer builds MergeParams).
#pragma once

#include "../merge_params.h"

namespace evolver_kernels {

void merge_cpu(const MergeParams& params);

}  // namespace evolver_kernels
