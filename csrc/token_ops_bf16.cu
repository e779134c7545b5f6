// The __nv_bfloat16 token kernels and their launchers (one dtype per translation unit: a parallel build).
#define INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_BF16

#include "token_launch.cuh"

INVNEXT_INSTANTIATE_LAUNCH(__nv_bfloat16, bf16_v8, 8, bf16_v1)
