/*
 * libFuzzer harness: the datagram receive path of the fast path, exactly as the pump drives it
 * (fp_on_gro per recvmsg): single records, PIECE runs in any order, duplicated and overlapping,
 * GRO-coalesced buffers, handshakes, from several source addresses, over time (partials age out).
 *
 * Input: mode (1 byte: bits 0-1 the window's starting top, bit 2 a TAP with virtio headers), then units of
 *   ctl (1) | length (2, big-endian) | [gro segment size (2) if ctl & 1] | bytes
 * ctl bits 1-2: source address (0: the link's peer), bits 3-7: clock advance in 50 ms steps.
 */
#include "fuzz_common.h"

static const long long TOPS[4] = {-1, 0x1000, 0xFFFFFFF0LL, 0x7FFFFFFFFFFFF000LL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FzIn in = {data, size};
    unsigned mode, ctl, len, seg;
    if (!fz_u8(&in, &mode)) return 0;
    FpCore c;
    fz_core(&c, 0, mode & 4 ? 1 : 0, TOPS[mode & 3]);
    fz_addr(&c.peer, &c.peerlen, 0);
    double now = 100.0;
    while (fz_u8(&in, &ctl) && fz_u16(&in, &len)) {
        seg = 0;
        if ((ctl & 1) && !fz_u16(&in, &seg)) break;
        if (len > in.n) len = (unsigned)in.n;
        struct sockaddr_storage a;
        socklen_t alen;
        fz_addr(&a, &alen, (ctl >> 1) & 3);
        now += (ctl >> 3) * 0.05;
        /* the bytes go through a copy sized exactly, so a read past the datagram is caught */
        unsigned char *d = malloc(len ? len : 1);
        if (!d) return 0;
        memcpy(d, in.p, len);
        fp_on_gro(&c, d, len, seg, &a, alen, now);
        free(d);
        in.p += len;
        in.n -= len;
        if (c.tx < 0 || c.tx >= SLOTS) __builtin_trap();
    }
    fz_release(&c);
    return 0;
}
