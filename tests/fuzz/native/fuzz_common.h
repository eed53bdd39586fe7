/*
 * Shared by the libFuzzer harnesses of the native fast path (tests/fuzz/native/fuzz_*.c).
 *
 * Each harness drives the sans-IO core (vna_agent/dataplane/_fastpath_core.c), the very functions
 * the pump calls with what it reads from its sockets, on a receiving core keyed with fixed session
 * keys (gen_corpus.py seals the seeds with the same ones). The callbacks read every byte the core
 * hands out (so AddressSanitizer sees any out-of-bounds frame) and check what must hold for every
 * input: a frame reaching the TAP carries a virtio_net_hdr the kernel may get, an event carries a
 * well-formed handshake. A broken invariant is __builtin_trap(): libFuzzer reports it as a crash.
 */
#ifndef SKYFERRY_FUZZ_COMMON_H
#define SKYFERRY_FUZZ_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_fastpath_core.h"

#define LOCAL_INDEX 0x0A0B0C0Du
#define NEXT_INDEX 0x0A0B0C0Eu
#define REMOTE_INDEX 0x01020304u

/* Keys of the session under test: the peer seals with RX_KEY, the core with TX_KEY; NEXT_KEY is the
 * peer's key of the next session (kind 1: promoted by its first record). */
static const unsigned char RX_KEY[32] = {0x52, 0x58, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                         15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
static const unsigned char TX_KEY[32] = {0x54, 0x58, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                         15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
static const unsigned char NEXT_KEY[32] = {0x4E, 0x58, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                           15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
/* This node's static public key (handshake mac1 is keyed by it). */
static const unsigned char STATIC_PUB[32] = {0x53, 0x50, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                             15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};

static volatile unsigned fz_sink;
static unsigned long long fz_frames, fz_events;

static inline unsigned fz_le16(const unsigned char *p) { return p[0] | ((unsigned)p[1] << 8); }

static inline void fz_touch(const unsigned char *p, size_t n) {
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    fz_sink += s;
}

/* What the local kernel gets must be a header fp_vnet_check accepts, with DATA_VALID cleared. */
static inline void fz_check_vnet(const unsigned char *h, size_t frame) {
    unsigned flags = h[0], type = h[1];
    if (flags & ~1u) __builtin_trap();
    if (type != 0 && type != 1 && type != 4 && type != 0x81 && type != 0x84) __builtin_trap();
    if ((flags & 1) && (size_t)fz_le16(h + 6) + fz_le16(h + 8) + 2 > frame) __builtin_trap();
    if (fz_le16(h + 2) > frame) __builtin_trap();
}

static inline int fz_tap(void *ctx, const struct iovec *iov, int count) {
    FpCore *c = ctx;
    size_t total = 0;
    for (int i = 0; i < count; i++) {
        fz_touch(iov[i].iov_base, iov[i].iov_len);
        total += iov[i].iov_len;
    }
    if (!total || total > MAX_PAYLOAD + VNET_LEN) __builtin_trap();
    if (c->vnet) {
        if (iov[0].iov_len < VNET_LEN) __builtin_trap();
        fz_check_vnet(iov[0].iov_base, total - VNET_LEN);
    }
    fz_frames++;
    return 0;
}

static inline int fz_event(void *ctx, int kind, long long value, const void *data, size_t len,
                    const struct sockaddr_storage *addr, socklen_t alen) {
    (void)ctx;
    (void)value;
    if (kind == EV_MESSAGE && len != INITIATION_LEN && len != RESPONSE_LEN) __builtin_trap();
    if (len) fz_touch(data, len);
    if (addr && alen > sizeof *addr) __builtin_trap();
    fz_events++;
    return 0;
}

static inline void fz_flow(void *ctx, int dir, int vnet, const unsigned char *f, size_t n, unsigned segs) {
    (void)ctx;
    (void)dir;
    (void)vnet;
    fz_touch(f, n < 128 ? n : 128);
    if (!segs) __builtin_trap();
}

static const FpIO FZ_IO = {.tap = fz_tap, .event = fz_event, .flow = fz_flow};

/* Buffers and cipher contexts live across runs (allocating 1 MiB per input would dominate). */
static struct {
    int ready;
    unsigned char *plain, *ring, *bufs[PARTIALS];
    EVP_CIPHER_CTX *send, *recv, *next_send, *next_recv;
} fz_keep;

static inline void fz_die(const char *why) {
    (void)why;
    abort();
}

/* A fresh receiving core (stream or datagram, vnet TAP or not) with the session under test (kind 0)
 * and a next one (kind 1); top: the window's top (-1: nothing received yet). */
static inline void fz_core(FpCore *c, int stream, int vnet, long long top) {
    if (!fz_keep.ready) {
        FpCore tmp;
        fp_core_init(&tmp, 1, 0, &FZ_IO, NULL);
        if (fp_core_alloc(&tmp) < 0) fz_die("alloc");
        fz_keep.plain = tmp.plain;
        fz_keep.ring = tmp.ring;
        for (int i = 0; i < PARTIALS; i++)
            if (!(fz_keep.bufs[i] = malloc(MAX_RECORD))) fz_die("alloc");
        Slot s, n;
        memset(&s, 0, sizeof s);
        memset(&n, 0, sizeof n);
        if (fp_slot_keys(&s, TX_KEY, RX_KEY) < 0 || fp_slot_keys(&n, TX_KEY, NEXT_KEY) < 0) fz_die("keys");
        fz_keep.send = s.send;
        fz_keep.recv = s.recv;
        fz_keep.next_send = n.send;
        fz_keep.next_recv = n.recv;
        fz_keep.ready = 1;
    }
    fp_core_init(c, stream, vnet, &FZ_IO, c);
    c->plain = fz_keep.plain;
    c->ring = fz_keep.ring;
    for (int i = 0; i < PARTIALS; i++) c->partials[i].buf = fz_keep.bufs[i];
    Slot *s = &c->slots[0], *n = &c->slots[1];
    s->used = n->used = 1;
    s->kind = 0;
    n->kind = 1;
    s->local_index = LOCAL_INDEX;
    n->local_index = NEXT_INDEX;
    s->remote_index = n->remote_index = REMOTE_INDEX;
    s->send = fz_keep.send;
    s->recv = fz_keep.recv;
    n->send = fz_keep.next_send;
    n->recv = fz_keep.next_recv;
    s->limit = n->limit = UINT64_MAX;
    if (top >= 0) {
        s->has_top = 1;
        s->top = (uint64_t)top;
        s->bits[0] = 1;
    }
    c->tx = 0;
    fp_set_static(c, STATIC_PUB);
}

/* The slots own no contexts: fz_keep does (fp_core_free must not run on a harness core). */
static inline void fz_release(FpCore *c) { memset(c->slots, 0, sizeof c->slots); }

static inline void fz_addr(struct sockaddr_storage *a, socklen_t *alen, unsigned which) {
    memset(a, 0, sizeof *a);
    a->ss_family = AF_INET;
    unsigned char *raw = (unsigned char *)a;
    raw[2] = 0x12; /* port 0x12xx */
    raw[3] = (unsigned char)which;
    raw[4] = 10;
    raw[7] = (unsigned char)(which + 1);
    *alen = 16;
}

/* Big-endian readers over the fuzz input. */
typedef struct {
    const uint8_t *p;
    size_t n;
} FzIn;

static inline int fz_u8(FzIn *in, unsigned *v) {
    if (in->n < 1) return 0;
    *v = in->p[0];
    in->p++;
    in->n--;
    return 1;
}

static inline int fz_u16(FzIn *in, unsigned *v) {
    if (in->n < 2) return 0;
    *v = ((unsigned)in->p[0] << 8) | in->p[1];
    in->p += 2;
    in->n -= 2;
    return 1;
}

#endif
