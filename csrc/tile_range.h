// Loop bounds of the segment-attention kernels, computed from sorted segment ids alone.
//
// Shared by the CUDA kernels and a host test (tile_range_test.cpp), so the index logic that
// replaces a mask is checked on a machine without a GPU.
//
// Because seg_k is sorted, the keys a query of segment s sees are the prefix [0, kv_len(s)); and
// because seg_q is sorted too, kv_len grows along the queries. So a tile of queries needs keys up
// to the kv_len of its last row, and no masking on key tiles below the kv_len of its first row.
// From the key side, the queries that see a key are a suffix [q_start, Nq).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SEGATTN_HD __host__ __device__ __forceinline__
#else
#define SEGATTN_HD inline
#endif

namespace segattn {

// First index i in sorted a[0, n) with a[i] > x (n when none).
SEGATTN_HD int first_greater(const int32_t* a, int n, int32_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// First index i in sorted a[0, n) with a[i] >= x (n when none).
SEGATTN_HD int first_not_less(const int32_t* a, int n, int32_t x) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] >= x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Number of keys a query of segment s_q sees: keys with seg <= s_q (inclusive) or < s_q (strict).
SEGATTN_HD int kv_len(const int32_t* seg_k, int nk, int32_t s_q, bool inclusive) {
  return inclusive ? first_greater(seg_k, nk, s_q) : first_not_less(seg_k, nk, s_q);
}

// First query that sees a key of segment s_k (nq when none); every later query sees it too.
SEGATTN_HD int q_start(const int32_t* seg_q, int nq, int32_t s_k, bool inclusive) {
  return inclusive ? first_not_less(seg_q, nq, s_k) : first_greater(seg_q, nq, s_k);
}

// Key loop of the query tile [m0, m0 + block_m): key tiles start at 0 and step by block_n; those
// starting below `unmasked_end` are seen whole by every row of the tile (no mask); those from
// there up to `end` straddle a segment boundary or the key tail and are masked per row.
struct KeyLoop {
  int end;
  int unmasked_end;
};

SEGATTN_HD KeyLoop key_loop(const int32_t* seg_q, int nq, const int32_t* seg_k, int nk, bool inclusive,
                            int m0, int block_m, int block_n) {
  const int last = (m0 + block_m < nq ? m0 + block_m : nq) - 1;
  const int first_len = kv_len(seg_k, nk, seg_q[m0], inclusive);
  const int last_len = kv_len(seg_k, nk, seg_q[last], inclusive);
  return KeyLoop{last_len, first_len / block_n * block_n};
}

// Query loop of the key tile [n0, n0 + block_n): query tiles start at `begin` (a multiple of
// block_m, so tiles line up with the forward's) and run to nq; those starting at or after
// `unmasked_begin` see every key of the tile (no mask); earlier ones are masked per key.
struct QueryLoop {
  int begin;
  int unmasked_begin;
};

SEGATTN_HD QueryLoop query_loop(const int32_t* seg_q, int nq, const int32_t* seg_k, int nk, bool inclusive,
                                int n0, int block_n, int block_m) {
  const int last = (n0 + block_n < nk ? n0 + block_n : nk) - 1;
  const int first_start = q_start(seg_q, nq, seg_k[n0], inclusive);
  const int last_start = q_start(seg_q, nq, seg_k[last], inclusive);
  return QueryLoop{first_start / block_m * block_m, last_start};
}

}  // namespace segattn
