"""The kernels: the public operators' checks and dispatch (ops), the contract-exact PyTorch oracle (reference),
Philox and seed derivation (rng), backend discovery (backends), the extensions' build (jit) and the Triton
kernels (triton/). Nothing here knows of models, files or evolution."""
