// CPU backend entry points (no torch types: the op layer converts tensors to DEParams / MaskParams).
#pragma once

#include "../de_params.h"

namespace evolver_kernels {

void de_mutate_crossover_cpu(const DEParams& params);
void crossover_mask_cpu(const MaskParams& params);

}  // namespace evolver_kernels
