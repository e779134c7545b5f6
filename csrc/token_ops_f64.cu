// The double token kernels and their launchers (one dtype per translation unit: a parallel build).
#define INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_F64

#include "token_launch.cuh"

INVNEXT_INSTANTIATE_LAUNCH(double, f64_v2, 2, f64_v1)
