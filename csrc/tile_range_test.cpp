// Host driver for tile_range.h: the exact loop-bound code the kernels run, fed from a test.
//
// stdin, per case:  nq nk inclusive block_m block_n \n seg_q[0..nq) \n seg_k[0..nk)
// stdout, per case: "kv_len" + nq values, "q_start" + nk values, then one line per query tile
//                   "key_loop m0 end unmasked_end" and per key tile "query_loop n0 begin unmasked_begin".
// tests/test_attention_cuda.py checks these against the dense visibility mask.
#include <cstdio>
#include <vector>

#include "tile_range.h"

int main() {
  int nq, nk, inclusive, block_m, block_n;
  while (std::scanf("%d %d %d %d %d", &nq, &nk, &inclusive, &block_m, &block_n) == 5) {
    std::vector<int32_t> seg_q(nq), seg_k(nk);
    for (auto& s : seg_q) if (std::scanf("%d", &s) != 1) return 1;
    for (auto& s : seg_k) if (std::scanf("%d", &s) != 1) return 1;
    const bool incl = inclusive != 0;
    std::printf("kv_len");
    for (int i = 0; i < nq; ++i) std::printf(" %d", segattn::kv_len(seg_k.data(), nk, seg_q[i], incl));
    std::printf("\nq_start");
    for (int j = 0; j < nk; ++j) std::printf(" %d", segattn::q_start(seg_q.data(), nq, seg_k[j], incl));
    std::printf("\n");
    for (int m0 = 0; m0 < nq; m0 += block_m) {
      const auto l = segattn::key_loop(seg_q.data(), nq, seg_k.data(), nk, incl, m0, block_m, block_n);
      std::printf("key_loop %d %d %d\n", m0, l.end, l.unmasked_end);
    }
    for (int n0 = 0; n0 < nk; n0 += block_n) {
      const auto l = segattn::query_loop(seg_q.data(), nq, seg_k.data(), nk, incl, n0, block_n, block_m);
      std::printf("query_loop %d %d %d\n", n0, l.begin, l.unmasked_begin);
    }
  }
  return 0;
}
