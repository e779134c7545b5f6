// The __half token kernels and their launchers (one dtype per translation unit: a parallel build).
#define INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_F16

#include "token_launch.cuh"

INVNEXT_INSTANTIATE_LAUNCH(__half, f16_v8, 8, f16_v1)
