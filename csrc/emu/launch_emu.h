// The emulation's SEGATTN_LAUNCH and SEGATTN_DYNAMIC_SMEM (launch.cuh includes this under
// SEGATTN_EMU): a launch runs the grid on the CPU (cuda_emu.h), the stream is ignored (launches
// run in order, synchronously), dynamic shared memory is the launch's per-block buffer.
#pragma once

#include "cuda_emu.h"

#define SEGATTN_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::segemu::launch_kernel(kernel, dim3(grid), dim3(block), (size_t)(smem_bytes), ##__VA_ARGS__)

#define SEGATTN_DYNAMIC_SMEM(type, name) \
  type* const name = reinterpret_cast<type*>(::segemu::dynamic_smem())
