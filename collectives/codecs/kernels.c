/* Kernels of a round's CPU work: the blockwise quantiser's passes, int4's packing, the own part's copy and
 * check, and the weighted sum, one loop each.
 *
 * torch runs int8 encoding as five passes per segment (amax, amin, multiply, round, cast), decoding as
 * two (cast, scale) and a weighted sum of k rows as k. These loops do the same fp32 operations in one
 * pass each, so they give the same bits (tests/test_kernels.py checks them against the torch path).
 * collectives/codecs/kernels.py compiles this file with the system C compiler on first use and falls back to
 * torch without one.
 *
 * Compiled with -O3 -fno-math-errno -ffp-contract=off: the loops vectorise, rintf becomes one rounding
 * instruction (round half to even, the default rounding mode, as torch.round), and no multiply is fused
 * with an add unless the code asks for it (fmaf), which would change the last bit.
 *
 * The caller checks every size and pointer: these functions trust their arguments.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Quantise nblocks blocks of `block` floats, each while it is in L1: its absmax a, its scale a / qmax
 * (written to scales[k]), then q = round-half-even(x * (1 / scale)) as int8, the multiply path of the
 * torch encoder (dense.BlockCodec._quantize), with its operations:
 * - the absmax is computed on the bit patterns with the sign bit cleared: for non-negative floats their
 *   unsigned order is the order of the values, Inf included, and a NaN sorts above Inf, so a block holding
 *   a NaN gets a NaN absmax (as torch's amax gives); an all-zero block (-0.0 included) gets +0.0;
 * - an all-zero block gets the multiplier 0, not 1 / 0 (torch: nan_to_num of the reciprocal);
 * - a result outside [-128, 127] (NaN or Inf from a non-finite input, which the caller then refuses) is
 *   stored as 0 rather than converted, which C leaves undefined.
 * Blocks go in groups of QGROUP (4 KB of floats at the default block of 64): the group's absmaxes first,
 * then its divisions, independent of each other so they overlap instead of each block waiting for its own
 * two, then its values; and the input QPREFETCH groups ahead is prefetched (a tensor read from memory went
 * from 0.69 to 0.47 ns per element on one core; in L1 from 0.36 to 0.28).
 * Returns 1 if a block's absmax is in (0, tiny): its 1 / scale may overflow, and the caller redoes the
 * whole segment on torch's divide-and-clamp path (as the torch encoder decides per segment); else 0. */
enum { QGROUP = 16, QPREFETCH = 4 };

int64_t loconet_quantize_blocks(const float *restrict x, int64_t nblocks, int64_t block, float qmax, float tiny,
                                float *restrict scales, int8_t *restrict q)
{
    int64_t has_tiny = 0;
    for (int64_t g = 0; g < nblocks; g += QGROUP) {
        const int64_t ng = nblocks - g < QGROUP ? nblocks - g : QGROUP;
        float absmax[QGROUP], m[QGROUP];
        for (int64_t j = 0; j < ng; j++) {
            const int64_t ahead = g + j + QPREFETCH * QGROUP;
            if (ahead < nblocks)
                for (int64_t l = 0; l < block; l += 16)
                    __builtin_prefetch(x + ahead * block + l);
            const uint32_t *u = (const uint32_t *)(x + (g + j) * block);
            uint32_t bits = 0;
            for (int64_t i = 0; i < block; i++) {
                uint32_t a = u[i] & 0x7fffffffu;
                bits = a > bits ? a : bits;
            }
            memcpy(&absmax[j], &bits, sizeof bits);
        }
        for (int64_t j = 0; j < ng; j++) {
            const float scale = absmax[j] / qmax;
            scales[g + j] = scale;
            has_tiny |= absmax[j] > 0.0f && absmax[j] < tiny;
            m[j] = absmax[j] == 0.0f ? 0.0f : 1.0f / scale;
        }
        for (int64_t j = 0; j < ng; j++) {
            const float *p = x + (g + j) * block;
            int8_t *o = q + (g + j) * block;
            const float mj = m[j];
            for (int64_t i = 0; i < block; i++) {
                float v = rintf(p[i] * mj);
                v = (v >= -128.0f && v <= 127.0f) ? v : 0.0f;
                o[i] = (int8_t)(int32_t)v;
            }
        }
    }
    return has_tiny;
}

/* out[i] = (float)q[i] * scale[k] for element i of block k.
 * With AVX2 and an aligned destination the stores bypass the cache: a decoded part is written once and
 * read much later (or by another pass), and a streaming store saves reading each line in before writing
 * it, which was most of the cost (0.47 -> 0.18 ns per element into memory that is not in cache). */
void loconet_dequantize(const int8_t *q, const float *scale, int64_t nblocks, int64_t block, float *out)
{
#if defined(__AVX2__)
    if (block % 8 == 0 && (uintptr_t)out % 32 == 0) {
        for (int64_t k = 0; k < nblocks; k++) {
            const __m256 s = _mm256_set1_ps(scale[k]);
            const int8_t *p = q + k * block;
            float *o = out + k * block;
            for (int64_t i = 0; i < block; i += 8) {
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + i))));
                _mm256_stream_ps(o + i, _mm256_mul_ps(v, s));
            }
        }
        _mm_sfence(); /* the streamed stores are visible before the caller reads them */
        return;
    }
#endif
    for (int64_t k = 0; k < nblocks; k++) {
        const float s = scale[k];
        const int8_t *p = q + k * block;
        float *o = out + k * block;
        for (int64_t i = 0; i < block; i++)
            o[i] = (float)p[i] * s;
    }
}

/* int4: out[k] holds q[2k] in its low nibble and q[2k + 1] in its high one, each stored as q + 8 (mod 16),
 * that is its two's-complement nibble with the top bit flipped (Int4Codec's torch path: the XOR with 0x88);
 * with n odd the last byte's high nibble is 0. One pass instead of torch's four. */
void loconet_pack_nibbles(const int8_t *restrict q, int64_t n, uint8_t *restrict out)
{
    const int64_t pairs = n / 2;
    for (int64_t k = 0; k < pairs; k++)
        out[k] = (uint8_t)(((q[2 * k] ^ 8) & 15) | (((q[2 * k + 1] ^ 8) & 15) << 4));
    if (n % 2)
        out[pairs] = (uint8_t)((q[n - 1] ^ 8) & 15);
}

#if defined(__AVX2__)
/* 32 packed bytes -> their 64 values (nibble - 8) in order, as two vectors of 32 int8. unpacklo/hi interleave
 * within 128-bit lanes (lane 0 of `a` is elements 0-15, lane 1 elements 32-47; `b` 16-31 and 48-63), and the
 * two permutes put the lanes in order. */
static inline void unpack_nibbles64(const uint8_t *p, __m256i *first, __m256i *second)
{
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    const __m256i mask = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
    *first = _mm256_sub_epi8(_mm256_permute2x128_si256(a, b, 0x20), eight);
    *second = _mm256_sub_epi8(_mm256_permute2x128_si256(a, b, 0x31), eight);
}

/* o[0..31] = (float)q[j] * s, streamed past the cache when o is aligned (as loconet_dequantize does). */
static inline void scale32(__m256i q, __m256 s, float *o, int aligned)
{
    const __m128i half[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < 2; e++) {
            const __m128i eight = e ? _mm_srli_si128(half[h], 8) : half[h];
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), s);
            float *d = o + 16 * h + 8 * e;
            if (aligned)
                _mm256_stream_ps(d, v);
            else
                _mm256_storeu_ps(d, v);
        }
}
#endif

/* The inverse of loconet_pack_nibbles, then the int8 dequantiser's product: out[i] = (float)(nibble i - 8) *
 * scale[i / block], for n values starting at a byte (element 0 in packed[0]'s low nibble). One pass instead of
 * torch's table lookup, copy and scale; with AVX2 and blocks of a multiple of 64, 64 values at a time. */
void loconet_dequantize_nibbles(const uint8_t *restrict packed, const float *restrict scale, int64_t n,
                                int64_t block, float *restrict out)
{
    int64_t b = 0;
#if defined(__AVX2__)
    if (block % 64 == 0) {
        const int aligned = (uintptr_t)out % 32 == 0;
        for (; b + block <= n; b += block) {
            const __m256 s = _mm256_set1_ps(scale[b / block]);
            for (int64_t i = b; i < b + block; i += 64) {
                __m256i first, second;
                unpack_nibbles64(packed + i / 2, &first, &second);
                scale32(first, s, out + i, aligned);
                scale32(second, s, out + i + 32, aligned);
            }
        }
        _mm_sfence(); /* the streamed stores are visible before the caller reads them */
    }
#endif
    for (; b < n; b += block) {
        const int64_t e = b + block < n ? b + block : n;
        const float s = scale[b / block];
        int64_t i = b;
        if (i % 2 && i < e) { /* an odd block size: this block starts in a byte's high nibble */
            out[i] = (float)((packed[i / 2] >> 4) - 8) * s;
            i++;
        }
        for (; i + 1 < e; i += 2) {
            const uint8_t v = packed[i / 2];
            out[i] = (float)((v & 15) - 8) * s;
            out[i + 1] = (float)((v >> 4) - 8) * s;
        }
        if (i < e)
            out[i] = (float)((packed[i / 2] & 15) - 8) * s;
    }
}

/* dst = src (n floats); returns 1 if every value is finite, else 0 (the caller then counts them).
 * One pass: the check looks at the exponent bits, an integer test. With AVX2 and an aligned destination
 * the stores stream past the cache, as the dequantiser's do (both fill a round's reduction rows). */
int64_t loconet_copy_finite(const float *src, int64_t n, float *dst)
{
    uint32_t bad = 0;
    int64_t i = 0;
#if defined(__AVX2__)
    if ((uintptr_t)dst % 32 == 0) {
        const __m256i exponent = _mm256_set1_epi32(0x7f800000);
        __m256i hits = _mm256_setzero_si256();
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(src + i);
            _mm256_stream_ps(dst + i, v);
            const __m256i e = _mm256_and_si256(_mm256_castps_si256(v), exponent);
            hits = _mm256_or_si256(hits, _mm256_cmpeq_epi32(e, exponent));
        }
        _mm_sfence();
        bad = !_mm256_testz_si256(hits, hits);
    }
#endif
    const uint32_t *u = (const uint32_t *)src;
    for (; i < n; i++) {
        dst[i] = src[i];
        bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    }
    return !bad;
}

#if defined(__FMA__)
/* out = sum over t of coef[t] * row order[t], accumulated in that order: the first product rounded, then
 * one fused multiply-add per further row, which is what torch's mul and add_(alpha) compute on a CPU with
 * FMA (tests/test_kernels.py compares the bits). Row r starts at rows + r * row_stride. out may be the
 * first row itself (an in-place reduction). Built only where the compiler targets FMA: without it fmaf is
 * a slow library call, and aggregation.weighted_sum keeps torch. Columns go in cache-sized slices so the
 * partial sums stay in L1 between rows. */
void loconet_weighted_sum(const float *rows, int64_t row_stride, const int64_t *order, const float *coef,
                          int64_t nrows, int64_t n, float *out)
{
    enum { SLICE = 2048 };
    for (int64_t b = 0; b < n; b += SLICE) {
        const int64_t e = b + SLICE < n ? b + SLICE : n;
        const float *r0 = rows + order[0] * row_stride;
        const float c0 = coef[0];
        for (int64_t i = b; i < e; i++)
            out[i] = r0[i] * c0;
        for (int64_t t = 1; t < nrows; t++) {
            const float *r = rows + order[t] * row_stride;
            const float c = coef[t];
            for (int64_t i = b; i < e; i++)
                out[i] = fmaf(r[i], c, out[i]);
        }
    }
}
#endif

#if defined(__FMA__)
/* values[0 .. e - b) = (nibble i - 8) as int8 for elements i in [b, e) of a packed int4 payload (b even). */
static void unpack_nibbles(const uint8_t *packed, int64_t b, int64_t e, int8_t *values)
{
    int64_t i = b;
#if defined(__AVX2__)
    for (; i + 64 <= e; i += 64) {
        __m256i first, second;
        unpack_nibbles64(packed + i / 2, &first, &second);
        _mm256_storeu_si256((__m256i *)(values + (i - b)), first);
        _mm256_storeu_si256((__m256i *)(values + (i - b) + 32), second);
    }
#endif
    for (; i + 1 < e; i += 2) {
        const uint8_t v = packed[i / 2];
        values[i - b] = (int8_t)((v & 15) - 8);
        values[i - b + 1] = (int8_t)((v >> 4) - 8);
    }
    if (i < e)
        values[i - b] = (int8_t)((packed[i / 2] & 15) - 8);
}

/* The owner's reduction of one chunk straight from what it received: out = sum over t of coef[t] * v_t,
 * accumulated in rank order t = 0..nrows-1 as loconet_weighted_sum does, where v_t is row t's fp32 values
 * (f[t], the owner's own contribution) or, where f[t] is NULL, its quantised payload dequantised on the fly,
 * (float)q_t[i] * scales[t][block k], the very product loconet_dequantize stores. q_t is q[t]'s int8 values,
 * or, where nibbles[t] is set, its int4 values packed two to a byte (unpacked a slice at a time into L1).
 * So the bits are those of dequantising into rows and summing them, without writing the rows and reading
 * them back. Returns 1 if every fp32 source value is finite, else 0 (out is then undefined). */
int64_t loconet_reduce_quantized(int64_t nrows, const float *const *f, const int8_t *const *q,
                                 const uint8_t *nibbles, const float *const *scales, const float *coef,
                                 int64_t block, int64_t n, float *out)
{
    enum { SLICE = 2048 };
    int8_t unpacked[SLICE];
    uint32_t bad = 0;
    for (int64_t b = 0; b < n; b += SLICE) {
        const int64_t e = b + SLICE < n ? b + SLICE : n;
        for (int64_t t = 0; t < nrows; t++) {
            const float c = coef[t];
            if (f[t] != NULL) {
                const float *r = f[t];
                const uint32_t *u = (const uint32_t *)r;
                if (t == 0)
                    for (int64_t i = b; i < e; i++) {
                        out[i] = r[i] * c;
                        bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
                    }
                else
                    for (int64_t i = b; i < e; i++) {
                        out[i] = fmaf(r[i], c, out[i]);
                        bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
                    }
                continue;
            }
            /* p[i - base] is element i's quantised value. */
            const int8_t *p = q[t];
            int64_t base = 0;
            if (nibbles[t]) {
                unpack_nibbles((const uint8_t *)q[t], b, e, unpacked);
                p = unpacked;
                base = b;
            }
            const float *s = scales[t];
            /* SLICE is a multiple of block only if block divides it: walk the slice block by block. */
            int64_t i = b;
            while (i < e) {
                const int64_t k = i / block;
                const int64_t stop = (k + 1) * block < e ? (k + 1) * block : e;
                const float sk = s[k];
                if (t == 0)
                    for (; i < stop; i++)
                        out[i] = ((float)p[i - base] * sk) * c;
                else
                    for (; i < stop; i++)
                        out[i] = fmaf((float)p[i - base] * sk, c, out[i]);
            }
        }
    }
    return !bad;
}
#endif
