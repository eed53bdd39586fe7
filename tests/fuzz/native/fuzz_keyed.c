/*
 * libFuzzer harness: what a keyed (malicious but authenticated) peer can make the fast path parse.
 * The input is sealed under the session's key, so it passes the AEAD and reaches the payload
 * parsers: bundles (u16 lengths), virtio_net_hdr checks and GSO accounting, frames of every size,
 * carried by each transport the pump has (one datagram, PIECE messages in and out of order, a
 * GRO-coalesced run, stream framing). A sealed record must always authenticate, whatever the
 * transport: a drop of a genuine record is a crash here as much as a memory error is.
 *
 * Input: ctl (1: bits 0-1 record flags VNET/BUNDLE, bit 2 vnet TAP, bits 3-5 transport, bit 6 next
 * session), chunk (1: piece size 64 + 32 * chunk), then the payload.
 */
#include "fuzz_common.h"

enum { T_ONE, T_PIECES, T_REVERSED, T_GRO, T_STREAM, T_COUNT };

static unsigned char rec[MAX_RECORD], pieces[MAX_RECORD + MAX_PIECES * PH];

static size_t seal(const unsigned char *payload, size_t n, int flags, int next) {
    FpCore tx; /* the peer: seals with the key the core under test opens with */
    fp_core_init(&tx, 0, 0, &FZ_IO, NULL);
    Slot *s = &tx.slots[0];
    s->used = 1;
    s->remote_index = next ? NEXT_INDEX : LOCAL_INDEX;
    s->limit = UINT64_MAX;
    Slot keys;
    memset(&keys, 0, sizeof keys);
    if (fp_slot_keys(&keys, next ? NEXT_KEY : RX_KEY, TX_KEY) < 0) abort();
    s->send = keys.send;
    tx.tx = 0;
    size_t r = fp_seal(&tx, payload, n, flags, rec, 1);
    fp_free_slot(&keys);
    return r;
}

static void frame_stream(FpCore *c, size_t n, double now) {
    size_t room;
    unsigned char *at = fp_stream_space(c, &room);
    if (room < n + 4) __builtin_trap();
    at[0] = (unsigned char)(n >> 24);
    at[1] = (unsigned char)(n >> 16);
    at[2] = (unsigned char)(n >> 8);
    at[3] = (unsigned char)n;
    memcpy(at + 4, rec, n);
    fp_stream_received(c, n + 4, now);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    unsigned ctl = data[0], chunk = 64 + 32u * data[1];
    const unsigned char *payload = data + 2;
    size_t n = size - 2;
    if (n > MAX_PAYLOAD) n = MAX_PAYLOAD;
    int flags = ctl & 3, vnet = (ctl >> 2) & 1, transport = ((ctl >> 3) & 7) % T_COUNT, next = (ctl >> 6) & 1;
    FpCore c;
    fz_core(&c, transport == T_STREAM, vnet, -1);
    fz_addr(&c.peer, &c.peerlen, 0);
    struct sockaddr_storage a;
    socklen_t alen;
    fz_addr(&a, &alen, 0);
    size_t r = seal(payload, n, flags, next);
    if (!r) __builtin_trap();
    size_t count = 0, pos = transport == T_ONE || transport == T_STREAM ? 0 : fp_split_pieces(rec, r, chunk, pieces, &count);
    if (count == 1) pos = 0; /* the pump sends a record that fits one piece as it is */
    double now = 100.0;
    if (transport == T_STREAM) {
        frame_stream(&c, r, now);
    } else if (!pos) {
        fp_on_datagram(&c, rec, r, &a, alen, now);
    } else if (transport == T_GRO) { /* the kernel coalesces a run: all pieces chunk long but the last */
        fp_on_gro(&c, pieces, pos, PH + chunk, &a, alen, now);
    } else {
        for (size_t i = 0; i < count; i++) {
            size_t k = transport == T_REVERSED ? count - 1 - i : i;
            size_t from = k * (PH + chunk), to = k + 1 == count ? pos : from + PH + chunk;
            fp_on_datagram(&c, pieces + from, to - from, &a, alen, now);
            if (transport == T_REVERSED && i == 0) fp_on_datagram(&c, pieces + from, to - from, &a, alen, now);
        }
    }
    if (c.records_in + c.keepalives_in != 1) __builtin_trap(); /* a genuine record was lost */
    if (c.drops[D_BAD_TAG] || c.drops[D_REPLAY] || c.drops[D_NO_SESSION]) __builtin_trap();
    if (next && c.tx != 1) __builtin_trap(); /* the next session's first record promotes it */
    fz_release(&c);
    return 0;
}
