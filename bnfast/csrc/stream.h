/* Streaming (non-temporal) copies: write whole cache lines without reading
 * them first, and keep the data out of the cache (bnfast/_loops.pyx).
 */
#ifndef BNFAST_STREAM_H
#define BNFAST_STREAM_H

#include <stddef.h>

/* Copy bytes with streaming stores where the CPU has them (every x86-64
   has SSE2); elsewhere a plain memcpy.  Call bnfast_fence() before the
   data is read by another thread. */
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
static void bnfast_stream(void* dst, const void* src, size_t bytes) {
    char* d = (char*)dst;
    const char* s = (const char*)src;
    size_t head = (size_t)((64 - ((uintptr_t)d & 63)) & 63);
    if (head > bytes) head = bytes;
    memcpy(d, s, head);
    d += head; s += head; bytes -= head;
    for (; bytes >= 64; bytes -= 64, d += 64, s += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((__m512i*)d, _mm512_loadu_si512((const void*)s));
#elif defined(__AVX__)
        _mm256_stream_si256((__m256i*)d, _mm256_loadu_si256((const __m256i*)s));
        _mm256_stream_si256((__m256i*)(d + 32), _mm256_loadu_si256((const __m256i*)(s + 32)));
#else
        _mm_stream_si128((__m128i*)d, _mm_loadu_si128((const __m128i*)s));
        _mm_stream_si128((__m128i*)(d + 16), _mm_loadu_si128((const __m128i*)(s + 16)));
        _mm_stream_si128((__m128i*)(d + 32), _mm_loadu_si128((const __m128i*)(s + 32)));
        _mm_stream_si128((__m128i*)(d + 48), _mm_loadu_si128((const __m128i*)(s + 48)));
#endif
    }
    memcpy(d, s, bytes);
}
static void bnfast_fence(void) { _mm_sfence(); }
#else
static void bnfast_stream(void* dst, const void* src, size_t bytes) { memcpy(dst, src, bytes); }
static void bnfast_fence(void) { }
#endif
/* Copy bytes start..end of a total-byte array, as one of the tasks that
   copy it in pieces, with streaming stores: this piece writes the whole
   destination cache lines that begin inside it (the array's first piece
   also its first line, the last piece its last).  Every line is written
   whole by one task: no piece leaves a line half-written by ordinary
   stores for a neighbour (another thread, maybe) to finish. */
static inline void bnfast_stream_piece(void* dst, const void* src, size_t total, size_t start,
                                       size_t end) {
    uintptr_t at = (uintptr_t)dst;
    size_t lo = start == 0 ? 0 : (size_t)(((at + start + 63) & ~(uintptr_t)63) - at);
    size_t hi = end >= total ? total : (size_t)(((at + end + 63) & ~(uintptr_t)63) - at);
    if (hi > total) hi = total;
    if (hi > lo) bnfast_stream((char*)dst + lo, (const char*)src + lo, hi - lo);
}

#endif /* BNFAST_STREAM_H */
