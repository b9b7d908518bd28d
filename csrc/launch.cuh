// The one launch site of the segment-attention kernels, so that the same source builds for nvcc
// and for the CPU emulation (which replaces this macro).
#pragma once

#if defined(SEGATTN_EMU)
#include "emu/launch_emu.h"
#else
#define SEGATTN_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (cudaStream_t)(stream)>>>(__VA_ARGS__)
#endif
