// The float token kernels and their launchers (one dtype per translation unit: a parallel build).
#define INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_F32

#include "token_launch.cuh"

INVNEXT_INSTANTIATE_LAUNCH(float, f32_v4, 4, f32_v1)
