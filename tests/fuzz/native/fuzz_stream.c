/*
 * libFuzzer harness: the stream receive path (u32 length framing into the receive ring), the bytes
 * split into reads of fuzzer-chosen sizes as recv() may return them, through the pump's own
 * fp_stream_space / fp_stream_received.
 *
 * Input: read-size seed (2 bytes), then the stream bytes.
 */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FzIn in = {data, size};
    unsigned seed;
    if (!fz_u16(&in, &seed)) return 0;
    FpCore c;
    fz_core(&c, 1, seed & 1, -1);
    uint32_t lcg = seed * 2654435761u + 1;
    double now = 100.0;
    while (in.n && !c.closed) {
        lcg = lcg * 1103515245u + 12345u;
        size_t want = (lcg >> 16) % 8 == 0 ? 1 + (lcg >> 8) % 70000 : 1 + (lcg >> 16) % 64;
        size_t room;
        unsigned char *at = fp_stream_space(&c, &room);
        if (!room || at < c.ring || at + room > c.ring + RX_RING) __builtin_trap();
        size_t k = want < room ? want : room;
        if (k > in.n) k = in.n;
        memcpy(at, in.p, k);
        fp_stream_received(&c, k, now);
        in.p += k;
        in.n -= k;
        now += 0.001;
        if (c.rstart > c.rend || c.rend > RX_RING) __builtin_trap();
        if (!c.closed && c.rend - c.rstart > MAX_RECORD + 4 + k) __builtin_trap(); /* only a partial record waits */
    }
    fz_release(&c);
    return 0;
}
