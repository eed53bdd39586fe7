/*
 * Sans-IO core of the native fast path: records, replay windows, datagram pieces, stream framing,
 * bundles, virtio_net_hdr checks and the handshake gate (see _fastpath_core.h).
 *
 * Everything here parses bytes an unauthenticated host may have sent, so every length is checked
 * before it is used, state changes only for a known session and an acceptable counter, and work
 * done before the AEAD tag is checked is bounded by the bytes received.
 */
#include "_fastpath_core.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Under AddressSanitizer (the fuzz harnesses) a partial's bytes are poisoned until a piece writes
 * them: reading a byte no piece covered is reported like an out-of-bounds read. */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FP_ASAN 1
#endif
#elif defined(__SANITIZE_ADDRESS__)
#define FP_ASAN 1
#endif
#ifdef FP_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

const char *const FP_DROP_NAMES[D_COUNT] = {
    "bad_tag", "replay", "no_session", "nonce_exhausted", "too_big", "decode", "incomplete",
    "queue_full", "offload_mismatch", "device", "handshake",
};

#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80
#define ETH_HLEN 14
#define TCP_CSUM_OFFSET 16
#define TCP_MIN 20

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static uint64_t be64(const unsigned char *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }
static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)(v >> 32));
    put32(p + 4, (uint32_t)v);
}
static unsigned le16(const unsigned char *p) { return p[0] | ((unsigned)p[1] << 8); }

/* -- life cycle ------------------------------------------------------------------------- */

void fp_core_init(FpCore *c, int stream, int vnet, const FpIO *io, void *ctx) {
    memset(c, 0, sizeof *c);
    c->stream = stream;
    c->vnet = vnet;
    c->io = io;
    c->ctx = ctx;
    c->tx = -1;
    c->hs_pass[0].tokens = HS_BURST_OTHER;
    c->hs_pass[1].tokens = HS_BURST_PEER;
    c->hs_check.tokens = HS_CHECK_BURST;
}

int fp_core_alloc(FpCore *c) {
    c->plain = malloc(MAX_PAYLOAD);
    if (!c->plain) return -1;
    if (c->stream) return (c->ring = malloc(RX_RING)) ? 0 : -1;
    for (int i = 0; i < PARTIALS; i++)
        if (!(c->partials[i].buf = malloc(MAX_RECORD))) return -1;
    return 0;
}

void fp_free_slot(Slot *s) {
    if (s->send) EVP_CIPHER_CTX_free(s->send);
    if (s->recv) EVP_CIPHER_CTX_free(s->recv);
    memset(s, 0, sizeof(*s));
}

void fp_core_free(FpCore *c) {
    for (int i = 0; i < SLOTS; i++) fp_free_slot(&c->slots[i]);
    for (int i = 0; i < PARTIALS; i++) {
        if (c->partials[i].buf) UNPOISON(c->partials[i].buf, MAX_RECORD);
        free(c->partials[i].buf);
        c->partials[i].buf = NULL;
    }
    free(c->plain);
    free(c->ring);
    c->plain = c->ring = NULL;
}

Slot *fp_slot_by_index(FpCore *c, uint32_t idx) {
    for (int i = 0; i < SLOTS; i++)
        if (c->slots[i].used && c->slots[i].local_index == idx) return &c->slots[i];
    return NULL;
}

static EVP_CIPHER_CTX *make_ctx(const unsigned char *key, int enc) {
    EVP_CIPHER_CTX *x = EVP_CIPHER_CTX_new();
    if (!x) return NULL;
    int ok = enc ? EVP_EncryptInit_ex(x, EVP_aes_256_gcm(), NULL, key, NULL)
                 : EVP_DecryptInit_ex(x, EVP_aes_256_gcm(), NULL, key, NULL);
    if (ok) return x;
    EVP_CIPHER_CTX_free(x);
    return NULL;
}

int fp_slot_keys(Slot *s, const unsigned char *send_key, const unsigned char *recv_key) {
    s->send = make_ctx(send_key, 1);
    s->recv = make_ctx(recv_key, 0);
    return s->send && s->recv ? 0 : -1;
}

/* -- replay window ---------------------------------------------------------------------- */

int fp_window_check(const Slot *s, uint64_t c) {
    if (!s->has_top || c > s->top) return 0;
    uint64_t d = s->top - c;
    if (d >= WINDOW_WORDS * 64) return -1;
    return (s->bits[d / 64] >> (d % 64)) & 1 ? -1 : 0;
}

static void window_shift(uint64_t *bits, uint64_t d) {
    if (d >= WINDOW_WORDS * 64) {
        memset(bits, 0, WINDOW_WORDS * sizeof *bits);
        return;
    }
    unsigned words = (unsigned)(d / 64), shift = (unsigned)(d % 64);
    for (int i = WINDOW_WORDS - 1; i >= 0; i--) {
        uint64_t v = 0;
        int src = i - (int)words;
        if (src >= 0) {
            v = bits[src] << shift;
            if (shift && src > 0) v |= bits[src - 1] >> (64 - shift);
        }
        bits[i] = v;
    }
}

void fp_window_accept(Slot *s, uint64_t c) {
    if (!s->has_top || c > s->top) {
        if (s->has_top) window_shift(s->bits, c - s->top);
        else memset(s->bits, 0, sizeof s->bits);
        s->top = c;
        s->has_top = 1;
        s->bits[0] |= 1;
        return;
    }
    uint64_t d = s->top - c;
    s->bits[d / 64] |= 1ULL << (d % 64);
}

/* Make dst's window also refuse every counter src's window refuses. */
void fp_window_merge(Slot *dst, const Slot *src) {
    if (!src->has_top) return;
    if (!dst->has_top) {
        dst->top = src->top;
        dst->has_top = 1;
        memcpy(dst->bits, src->bits, sizeof dst->bits);
        return;
    }
    uint64_t tmp[WINDOW_WORDS];
    memcpy(tmp, src->bits, sizeof tmp);
    if (src->top > dst->top) {
        window_shift(dst->bits, src->top - dst->top);
        dst->top = src->top;
    } else if (dst->top > src->top) {
        window_shift(tmp, dst->top - src->top);
    }
    for (int i = 0; i < WINDOW_WORDS; i++) dst->bits[i] |= tmp[i];
}

/* -- sealing ---------------------------------------------------------------------------- */

static void nonce_of(unsigned char *n, uint64_t c) {
    memset(n, 0, 4);
    put64(n + 4, c);
}

size_t fp_seal(FpCore *c, const unsigned char *payload, size_t n, int flags, unsigned char *out, unsigned frames) {
    if (c->tx < 0) {
        c->drops[D_NO_SESSION] += frames;
        return 0;
    }
    Slot *s = &c->slots[c->tx];
    if (n > MAX_PAYLOAD) {
        c->drops[D_TOO_BIG] += frames;
        return 0;
    }
    if (s->next_counter >= s->limit) {
        c->drops[D_NONCE] += frames;
        return 0;
    }
    uint64_t ctr = s->next_counter++;
    out[0] = T_DATA;
    out[1] = (unsigned char)flags;
    out[2] = out[3] = 0;
    put32(out + 4, s->remote_index);
    put64(out + 8, ctr);
    unsigned char nonce[12];
    nonce_of(nonce, ctr);
    int l = 0, l2 = 0;
    if (!EVP_EncryptInit_ex(s->send, NULL, NULL, NULL, nonce) || !EVP_EncryptUpdate(s->send, NULL, &l, out, HDR) ||
        !EVP_EncryptUpdate(s->send, out + HDR, &l, payload, (int)n) ||
        !EVP_EncryptFinal_ex(s->send, out + HDR + l, &l2) ||
        !EVP_CIPHER_CTX_ctrl(s->send, EVP_CTRL_GCM_GET_TAG, TAG, out + HDR + n)) {
        c->drops[D_DECODE]++;
        return 0;
    }
    s->records_sent++;
    s->bytes_sent += n;
    return HDR + n + TAG;
}

size_t fp_split_pieces(const unsigned char *rec, size_t n, size_t chunk, unsigned char *out, size_t *count) {
    size_t k = chunk ? (n + chunk - 1) / chunk : 0;
    if (!k || k > MAX_PIECES) return 0;
    uint32_t receiver = be32(rec + 4), seq = (uint32_t)be64(rec + 8);
    size_t pos = 0;
    for (size_t i = 0; i < k; i++) {
        size_t off = i * chunk, len = n - off < chunk ? n - off : chunk;
        out[pos] = T_PIECE;
        out[pos + 1] = (unsigned char)i;
        out[pos + 2] = (unsigned char)k;
        out[pos + 3] = 0;
        put32(out + pos + 4, receiver);
        put32(out + pos + 8, seq);
        put32(out + pos + 12, (uint32_t)off);
        memcpy(out + pos + PH, rec + off, len);
        pos += PH + len;
    }
    *count = k;
    return pos;
}

/* -- frames ----------------------------------------------------------------------------- */

unsigned fp_gso_segments(const unsigned char *f, size_t n, int vnet) {
    if (!vnet || n < VNET_LEN) return 1;
    unsigned flags = f[0], kind = f[1] & ~0x80u;
    unsigned hdr_len = le16(f + 2), gso_size = le16(f + 4), csum_start = le16(f + 6);
    if (kind == 0 || gso_size == 0) return 1;
    long frame_len = (long)n - VNET_LEN, data;
    if (flags & 1) {
        long l4 = 8;
        if ((kind == 1 || kind == 4) && (long)csum_start + 13 <= frame_len) l4 = (f[VNET_LEN + csum_start + 12] >> 4) * 4;
        data = frame_len - csum_start - l4;
    } else {
        data = frame_len - hdr_len;
    }
    long s = (data + gso_size - 1) / gso_size;
    return s < 1 ? 1 : (unsigned)s;
}

/* The L3 protocol of an Ethernet frame (one 802.1Q tag skipped) and where its header starts. */
static unsigned ether_type(const unsigned char *e, size_t n, size_t *l3) {
    if (n < ETH_HLEN) return 0;
    unsigned t = ((unsigned)e[12] << 8) | e[13];
    *l3 = ETH_HLEN;
    if (t == 0x8100 && n >= ETH_HLEN + 4) {
        t = ((unsigned)e[16] << 8) | e[17];
        *l3 = ETH_HLEN + 4;
    }
    return t;
}

/* Only what a TAP with CSUM|TSO4|TSO6|TSO_ECN emits, every offset inside the frame. DATA_VALID (the
 * sender's NIC verified the checksum) is cleared: this kernel verifies it itself. */
int fp_vnet_check(const unsigned char *f, size_t n) {
    if (n < VNET_LEN) return -1;
    unsigned flags = f[0], type = f[1], kind = f[1] & ~VNET_GSO_ECN;
    unsigned hdr_len = le16(f + 2), gso_size = le16(f + 4), csum_start = le16(f + 6), csum_off = le16(f + 8);
    size_t frame = n - VNET_LEN, l3 = 0;
    if (flags & ~(unsigned)(VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID)) return -1;
    if (hdr_len > frame) return -1;
    if ((flags & VNET_F_NEEDS_CSUM) && ((size_t)csum_start + csum_off + 2 > frame || csum_start < ETH_HLEN))
        return -1;
    if (type == 0) return 0;
    if (kind != VNET_GSO_TCPV4 && kind != VNET_GSO_TCPV6) return -1; /* UFO, USO, unknown */
    unsigned et = ether_type(f + VNET_LEN, frame, &l3);
    if (et != (kind == VNET_GSO_TCPV4 ? 0x0800u : 0x86DDu)) return -1;
    if (!(flags & VNET_F_NEEDS_CSUM) || csum_off != TCP_CSUM_OFFSET || csum_start < l3 + 20 ||
        (size_t)csum_start + TCP_MIN > frame)
        return -1;
    if (gso_size == 0 || gso_size > frame) return -1;
    return 0;
}

static int tap_write(FpCore *c, unsigned char *f, size_t n, int flags) {
    int vnet = flags & FLAG_VNET ? 1 : 0;
    if (vnet ? n <= VNET_LEN : !n) { /* the TAP refuses an empty frame: not worth a system call */
        c->drops[D_DECODE]++;
        return -1;
    }
    if (vnet && fp_vnet_check(f, n) < 0) {
        c->drops[D_OFFLOAD]++;
        return -1;
    }
    if (vnet) f[0] &= (unsigned char)~VNET_F_DATA_VALID;
    static const unsigned char zero[VNET_LEN];
    struct iovec iov[2];
    int cnt = 1;
    if (vnet == c->vnet) {
        iov[0] = (struct iovec){.iov_base = f, .iov_len = n};
    } else if (c->vnet) { /* plain frame into a VNET_HDR TAP: "no offload" header */
        iov[0] = (struct iovec){.iov_base = (void *)zero, .iov_len = VNET_LEN};
        iov[1] = (struct iovec){.iov_base = f, .iov_len = n};
        cnt = 2;
    } else if (!f[1] && !(f[0] & VNET_F_NEEDS_CSUM)) { /* no GSO, checksum complete */
        iov[0] = (struct iovec){.iov_base = f + VNET_LEN, .iov_len = n - VNET_LEN};
    } else {
        c->drops[D_OFFLOAD]++;
        return -1;
    }
    int err = c->io->tap(c->ctx, iov, cnt);
    if (err) {
        c->drops[err == EAGAIN || err == EWOULDBLOCK ? D_QUEUE_FULL : D_DEVICE]++;
        return -1;
    }
    unsigned segs = (vnet && f[1]) ? fp_gso_segments(f, n, 1) : 1;
    c->bytes_in += n;
    c->frames_in += segs;
    if (c->io->flow) c->io->flow(c->ctx, 2, vnet, f, n, segs);
    return 0;
}

void fp_deliver(FpCore *c, unsigned char *p, size_t n, int flags) {
    if (!n) {
        c->keepalives_in++;
        return;
    }
    c->records_in++;
    if (!(flags & FLAG_BUNDLE)) {
        tap_write(c, p, n, flags);
        return;
    }
    size_t pos = 0;
    while (pos < n) {
        if (pos + 2 > n) {
            c->drops[D_DECODE]++;
            return;
        }
        size_t end = pos + 2 + ((size_t)p[pos] << 8 | p[pos + 1]);
        if (end > n) {
            c->drops[D_DECODE]++;
            return;
        }
        tap_write(c, p + pos + 2, end - pos - 2, flags);
        pos = end;
    }
}

/* -- records ---------------------------------------------------------------------------- */

static void emit(FpCore *c, int kind, long long value, const void *data, size_t len, const struct sockaddr_storage *a,
                 socklen_t alen) {
    c->io->event(c->ctx, kind, value, data, len, a, alen);
}

int fp_open_record(FpCore *c, const unsigned char *rec, size_t n, double now, int *advanced) {
    if (advanced) *advanced = 0;
    if (n < OVERHEAD) {
        c->drops[D_DECODE]++;
        return 0;
    }
    if (n > MAX_RECORD) { /* p->plain holds MAX_PAYLOAD: never decrypt more than that */
        c->drops[D_TOO_BIG]++;
        return 0;
    }
    int flags = rec[1];
    Slot *s = fp_slot_by_index(c, be32(rec + 4));
    if (!s) {
        c->drops[D_NO_SESSION]++;
        return 0;
    }
    uint64_t ctr = be64(rec + 8);
    if (fp_window_check(s, ctr) < 0) {
        c->drops[D_REPLAY]++;
        return 0;
    }
    size_t m = n - OVERHEAD;
    unsigned char nonce[12];
    nonce_of(nonce, ctr);
    int l = 0, l2 = 0;
    if (!EVP_DecryptInit_ex(s->recv, NULL, NULL, NULL, nonce) || !EVP_DecryptUpdate(s->recv, NULL, &l, rec, HDR) ||
        !EVP_DecryptUpdate(s->recv, c->plain, &l, rec + HDR, (int)m) ||
        !EVP_CIPHER_CTX_ctrl(s->recv, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(rec + n - TAG)) ||
        EVP_DecryptFinal_ex(s->recv, c->plain + l, &l2) <= 0) {
        c->drops[D_BAD_TAG]++;
        return 0;
    }
    if (advanced) *advanced = !s->has_top || ctr > s->top;
    fp_window_accept(s, ctr);
    s->records_received++;
    s->bytes_received += m;
    c->last_rx = now;
    if (s->kind == 1) { /* first record under the next session: it becomes current */
        for (int i = 0; i < SLOTS; i++)
            if (c->slots[i].used && c->slots[i].kind == 0) c->slots[i].kind = 2;
        s->kind = 0;
        c->tx = (int)(s - c->slots);
        emit(c, EV_ROTATED, s->local_index, NULL, 0, NULL, 0);
    }
    fp_deliver(c, c->plain, m, flags);
    return 1;
}

/* -- handshakes ------------------------------------------------------------------------- */

static void b2s_keyed_state(uint32_t state[8], const unsigned char key[32], size_t out_len);
static void b2s_from_state(unsigned char *out, size_t out_len, const uint32_t state[8], const void *in, size_t n);

void fp_set_static(FpCore *c, const unsigned char pub[32]) {
    unsigned char in[8 + 32], key[32];
    memcpy(in, "mac1----", 8);
    memcpy(in + 8, pub, 32);
    fp_blake2s(key, 32, NULL, 0, in, sizeof in);
    b2s_keyed_state(c->mac1_state, key, MAC1_LEN);
    c->has_mac1 = 1;
}

static int mac1_ok(const FpCore *c, const unsigned char *d, size_t n) {
    unsigned char mac[MAC1_LEN];
    b2s_from_state(mac, MAC1_LEN, c->mac1_state, d, n - MAC1_LEN);
    unsigned diff = 0;
    for (int i = 0; i < MAC1_LEN; i++) diff |= mac[i] ^ d[n - MAC1_LEN + i];
    return diff == 0;
}

/* 1 and one token less if the bucket has one. */
static int take_token(FpBucket *b, double rate, double burst, double now) {
    double t = b->tokens + (now - b->stamp) * rate;
    b->tokens = t > burst ? burst : t;
    b->stamp = now;
    if (b->tokens < 1.0) return 0;
    b->tokens -= 1.0;
    return 1;
}

static int refuse(FpCore *c) {
    c->drops[D_HANDSHAKE]++;
    return 0;
}

int fp_handshake_gate(FpCore *c, const unsigned char *d, size_t n, int from_peer, double now) {
    int resp;
    if (n == INITIATION_LEN && d[0] == T_INITIATION) resp = 0;
    else if (n == RESPONSE_LEN && d[0] == T_RESPONSE) resp = 1;
    else return refuse(c);
    from_peer = from_peer ? 1 : 0;
    if (d[1] || d[2] || d[3]) return refuse(c);
    if (c->hs_queued[resp][from_peer] >= (unsigned)(from_peer ? HS_QUOTA_PEER : HS_QUOTA_OTHER)) return refuse(c);
    if (!from_peer && !take_token(&c->hs_check, HS_CHECK_RATE, HS_CHECK_BURST, now)) return refuse(c);
    if (c->has_mac1 && !mac1_ok(c, d, n)) return refuse(c);
    if (!(from_peer ? take_token(&c->hs_pass[1], HS_RATE_PEER, HS_BURST_PEER, now)
                    : take_token(&c->hs_pass[0], HS_RATE_OTHER, HS_BURST_OTHER, now)))
        return refuse(c);
    c->hs_queued[resp][from_peer]++;
    return 1;
}

void fp_handshakes_taken(FpCore *c) { memset(c->hs_queued, 0, sizeof c->hs_queued); }

static int same_peer(const FpCore *c, const struct sockaddr_storage *a, socklen_t alen) {
    return c->peerlen && alen == c->peerlen && !memcmp(a, &c->peer, alen);
}

static void on_message(FpCore *c, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen,
                       double now) {
    if (d[0] != T_INITIATION && d[0] != T_RESPONSE) { /* no message of ours */
        c->drops[D_DECODE]++;
        return;
    }
    int from_peer = c->stream || same_peer(c, a, alen);
    if (!fp_handshake_gate(c, d, n, from_peer, now)) return;
    if (c->io->event(c->ctx, EV_MESSAGE, 0, d, n, a, alen) < 0) { /* not queued: give its quota back */
        c->hs_queued[d[0] == T_RESPONSE][from_peer ? 1 : 0]--;
        c->drops[D_HANDSHAKE]++;
    }
}

/* -- datagrams -------------------------------------------------------------------------- */

static void note_peer(FpCore *c, const struct sockaddr_storage *a, socklen_t alen) {
    if (!alen || same_peer(c, a, alen)) return;
    memcpy(&c->peer, a, sizeof(*a));
    c->peerlen = alen;
    emit(c, EV_PEER, 0, NULL, 0, a, alen);
}

/* The full counter a piece's low 32 bits stand for: the one nearest the window's top. 0 when it is
 * not one this session could accept (replayed, older than the window, or too far ahead). */
static int piece_counter(const Slot *s, uint32_t seq, uint64_t *out) {
    uint64_t top = s->has_top ? s->top : 0, ctr = (top & ~0xffffffffULL) | seq;
    if (ctr > top && ctr - top > 0x80000000ULL && ctr >= (1ULL << 32)) ctr -= 1ULL << 32;
    else if (ctr < top && top - ctr > 0x80000000ULL) ctr += 1ULL << 32;
    if (ctr > top && ctr - top > PARTIAL_AHEAD) return 0;
    if (fp_window_check(s, ctr) < 0) return 0;
    *out = ctr;
    return 1;
}

/* Where a piece goes: the partial of (receiver, seq, count, piece_len, source), a new one, or NULL. A
 * piece that disagrees with another on count, size or source opens its own partial rather than
 * spoiling one. */
static Partial *find_partial(FpCore *c, uint32_t receiver, uint32_t seq, int count, size_t plen,
                             const struct sockaddr_storage *a, socklen_t alen, double now) {
    Partial *free_q = NULL, *oldest = NULL;
    int same_seq = 0;
    for (int i = 0; i < PARTIALS; i++) {
        Partial *q = &c->partials[i];
        if (q->used && now - q->created > PARTIAL_TTL) { /* a piece never came */
            q->used = 0;
            c->drops[D_INCOMPLETE]++;
        }
        if (!q->used) {
            if (!free_q) free_q = q;
            continue;
        }
        if (q->receiver == receiver && q->seq == seq) {
            if (q->count == count && q->piece_len == plen && q->fromlen == alen && !memcmp(&q->from, a, alen)) return q;
            same_seq++;
        }
        if (!oldest || q->stamp < oldest->stamp) oldest = q;
    }
    if (same_seq >= 3) return NULL; /* versions of one record being built already: enough */
    Partial *q = free_q;
    if (!q) {
        q = oldest;
        c->drops[D_INCOMPLETE]++;
    }
    unsigned char *buf = q->buf;
    memset(q, 0, sizeof *q);
    q->buf = buf;
    POISON(buf, MAX_RECORD);
    q->used = 1;
    q->receiver = receiver;
    q->seq = seq;
    q->count = count;
    q->piece_len = plen;
    memcpy(&q->from, a, alen);
    q->fromlen = alen;
    q->stamp = ++c->pstamp;
    q->created = now;
    return q;
}

static void complete(FpCore *c, Partial *q, const struct sockaddr_storage *a, socklen_t alen, double now) {
    q->used = 0;
    const unsigned char *b = q->buf;
#ifdef FP_ASAN
    if (__asan_region_is_poisoned(q->buf, q->total)) __builtin_trap(); /* a byte no piece wrote (AES reads it) */
#endif
    if (b[0] != T_DATA || be32(b + 4) != q->receiver || (uint32_t)be64(b + 8) != q->seq) {
        c->drops[D_DECODE]++;
        return;
    }
    int advanced = 0;
    if (fp_open_record(c, b, q->total, now, &advanced) && advanced) note_peer(c, a, alen);
}

static void on_piece(FpCore *c, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen,
                     double now) {
    if (n <= PH) {
        c->drops[D_DECODE]++;
        return;
    }
    int idx = d[1], count = d[2];
    uint32_t receiver = be32(d + 4), seq = be32(d + 8), off = be32(d + 12);
    size_t len = n - PH, plen;
    int last = idx == count - 1;
    if (count < 2 || idx >= count || d[3]) {
        c->drops[D_DECODE]++;
        return;
    }
    /* Pieces tile the record: piece i at i * piece_len, all piece_len long but the last (1..piece_len). */
    plen = last ? off / (size_t)idx : len;
    if (!plen || (size_t)idx * plen != off || len > plen || (size_t)(count - 1) * plen + (last ? len : 1) > MAX_RECORD) {
        c->drops[D_DECODE]++;
        return;
    }
    Slot *s = fp_slot_by_index(c, receiver);
    if (!s) {
        c->drops[D_NO_SESSION]++;
        return;
    }
    uint64_t ctr;
    if (!piece_counter(s, seq, &ctr)) {
        c->drops[D_REPLAY]++;
        return;
    }
    Partial *q = find_partial(c, receiver, seq, count, plen, a, alen, now);
    if (!q) {
        c->drops[D_DECODE]++;
        return;
    }
    UNPOISON(q->buf + off, len);
    memcpy(q->buf + off, d + PH, len); /* a repeated piece replaces the earlier one: a forged early copy loses */
    if (last) q->total = off + len;
    if (!((q->have[idx / 64] >> (idx % 64)) & 1)) {
        q->have[idx / 64] |= 1ULL << (idx % 64);
        q->got++;
    }
    if (q->got == count) complete(c, q, a, alen, now);
}

void fp_on_datagram(FpCore *c, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen,
                    double now) {
    if (!n) return;
    if (alen > sizeof *a) alen = sizeof *a;
    if (d[0] == T_DATA) {
        int advanced = 0;
        if (fp_open_record(c, d, n, now, &advanced) && advanced) note_peer(c, a, alen);
    } else if (d[0] == T_PIECE) {
        on_piece(c, d, n, a, alen, now);
    } else {
        on_message(c, d, n, a, alen, now);
    }
}

void fp_on_gro(FpCore *c, const unsigned char *buf, size_t k, size_t seg, const struct sockaddr_storage *a,
               socklen_t alen, double now) {
    if (!seg || seg > k) seg = k;
    for (size_t off = 0; off < k; off += seg) {
        size_t len = k - off < seg ? k - off : seg;
        fp_on_datagram(c, buf + off, len, a, alen, now);
    }
}

/* -- stream ----------------------------------------------------------------------------- */

void fp_stream_parse(FpCore *c, double now) {
    unsigned char *b = c->ring;
    size_t start = c->rstart, end = c->rend;
    while (!c->closed && end - start >= 4) {
        uint32_t ln = be32(b + start);
        if (ln == 0 || ln > MAX_RECORD) {
            c->drops[D_DECODE]++;
            c->closed = 1;
            emit(c, EV_CLOSED, EPROTO, NULL, 0, NULL, 0);
            c->rstart = c->rend = 0;
            return;
        }
        size_t s = start + 4;
        if (end - s < ln) break;
        start = s + ln;
        if (b[s] == T_DATA) fp_open_record(c, b + s, ln, now, NULL);
        else on_message(c, b + s, ln, NULL, 0, now);
    }
    if (start == end) start = end = 0;
    c->rstart = start;
    c->rend = end;
}

unsigned char *fp_stream_space(FpCore *c, size_t *room) {
    if (RX_RING - c->rend < MAX_RECORD + 4) {
        memmove(c->ring, c->ring + c->rstart, c->rend - c->rstart);
        c->rend -= c->rstart;
        c->rstart = 0;
    }
    *room = RX_RING - c->rend;
    return c->ring + c->rend;
}

void fp_stream_received(FpCore *c, size_t k, double now) {
    c->rend += k;
    fp_stream_parse(c, now);
}

/* -- BLAKE2s (RFC 7693) ----------------------------------------------------------------- */

static const uint32_t B2S_IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                                   0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};
static const unsigned char B2S_SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

typedef struct {
    unsigned char b[64];
    uint32_t h[8], t[2];
    size_t c;
} B2s;

static uint32_t rotr32(uint32_t x, int y) { return (x >> y) | (x << (32 - y)); }

static void b2s_g(uint32_t *v, int a, int b, int c, int d, uint32_t x, uint32_t y) {
    v[a] += v[b] + x;
    v[d] = rotr32(v[d] ^ v[a], 16);
    v[c] += v[d];
    v[b] = rotr32(v[b] ^ v[c], 12);
    v[a] += v[b] + y;
    v[d] = rotr32(v[d] ^ v[a], 8);
    v[c] += v[d];
    v[b] = rotr32(v[b] ^ v[c], 7);
}

static void b2s_compress(B2s *x, int last) {
    uint32_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = x->h[i];
        v[i + 8] = B2S_IV[i];
    }
    v[12] ^= x->t[0];
    v[13] ^= x->t[1];
    if (last) v[14] = ~v[14];
    for (int i = 0; i < 16; i++)
        m[i] = (uint32_t)x->b[4 * i] | (uint32_t)x->b[4 * i + 1] << 8 | (uint32_t)x->b[4 * i + 2] << 16 |
               (uint32_t)x->b[4 * i + 3] << 24;
    for (int r = 0; r < 10; r++) {
        const unsigned char *s = B2S_SIGMA[r];
        b2s_g(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
        b2s_g(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
        b2s_g(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
        b2s_g(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
        b2s_g(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
        b2s_g(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
        b2s_g(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
        b2s_g(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) x->h[i] ^= v[i] ^ v[i + 8];
}

static void b2s_update(B2s *x, const unsigned char *in, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (x->c == 64) {
            x->t[0] += 64;
            if (x->t[0] < 64) x->t[1]++;
            b2s_compress(x, 0);
            x->c = 0;
        }
        x->b[x->c++] = in[i];
    }
}

static void b2s_final(B2s *x, unsigned char *out, size_t out_len) {
    x->t[0] += (uint32_t)x->c;
    if (x->t[0] < x->c) x->t[1]++;
    while (x->c < 64) x->b[x->c++] = 0;
    b2s_compress(x, 1);
    for (size_t i = 0; i < out_len; i++) out[i] = (unsigned char)(x->h[i >> 2] >> (8 * (i & 3)));
}

/* The chaining value after the (padded) key block, for messages that are never empty. */
static void b2s_keyed_state(uint32_t state[8], const unsigned char key[32], size_t out_len) {
    B2s x;
    memset(&x, 0, sizeof x);
    memcpy(x.h, B2S_IV, sizeof x.h);
    x.h[0] ^= 0x01010000u ^ (32u << 8) ^ (uint32_t)out_len;
    memcpy(x.b, key, 32);
    x.t[0] = 64;
    b2s_compress(&x, 0);
    memcpy(state, x.h, sizeof x.h);
}

static void b2s_from_state(unsigned char *out, size_t out_len, const uint32_t state[8], const void *in, size_t n) {
    B2s x;
    memset(&x, 0, sizeof x);
    memcpy(x.h, state, sizeof x.h);
    x.t[0] = 64;
    b2s_update(&x, in, n);
    b2s_final(&x, out, out_len);
}

void fp_blake2s(unsigned char *out, size_t out_len, const void *key, size_t key_len, const void *in, size_t in_len) {
    B2s x;
    memset(&x, 0, sizeof x);
    memcpy(x.h, B2S_IV, sizeof x.h);
    x.h[0] ^= 0x01010000u ^ ((uint32_t)key_len << 8) ^ (uint32_t)out_len;
    if (key_len) {
        b2s_update(&x, key, key_len);
        x.c = 64; /* the key block is padded to a full block */
    }
    b2s_update(&x, in, in_len);
    b2s_final(&x, out, out_len);
}
