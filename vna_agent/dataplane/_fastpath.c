/*
 * Native fast path of an established tunnel session (see fastpath.py).
 *
 * A Pump owns one thread that moves frames between a TAP and the tunnel's
 * connected socket without the GIL: TAP frames are bundled and sealed into
 * AES-256-GCM records exactly as record.py/tunnel.py do, written to the TCP
 * stream (u32 length framing) or the UDP socket (one datagram, or PIECE
 * messages sent with UDP_SEGMENT); received DATA records and datagram pieces
 * are reassembled, checked against a 2048-bit replay window, opened and
 * written to the TAP. Everything that is not a DATA record of a known session
 * (handshakes, unknown messages), and what Python must know (a session
 * promoted, the connection closed, a new peer address, EMSGSIZE), is queued
 * as an event and signalled on an eventfd that asyncio watches. Python keeps
 * the handshake, the rekey decisions and the connection life cycle.
 *
 * The thread never blocks while it holds the pump's lock: stream output that
 * the socket does not take stays queued, the TAP leaves the epoll set and the
 * socket is polled for EPOLLOUT (asyncio's pause_writing), while the socket
 * is still read. Python-facing methods release the GIL before taking the lock
 * and build Python objects only after releasing it.
 *
 * Wire formats are those of wire.py; interop tests run this code against
 * the Python implementation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_SEGMENT_OPT 103
#define UDP_GRO_OPT 104

#define T_INITIATION 1
#define T_RESPONSE 2
#define T_DATA 4
#define T_PIECE 6
#define FLAG_VNET 0x01
#define FLAG_BUNDLE 0x02
#define HDR 16
#define TAG 16
#define OVERHEAD (HDR + TAG)
#define PH 16
#define VNET_LEN 10
#define MAX_PAYLOAD (65536 + 512)
#define MAX_RECORD (OVERHEAD + MAX_PAYLOAD)
#define BUNDLE_FRAME_MAX 9216
#define READ_BATCH 64
#define RX_RING (1 << 20)
#define TX_BUF (1 << 19)
#define OBUF_CAP (TX_BUF + MAX_RECORD + 8)
#define MAX_HANDSHAKE 512
#define MAX_QUEUED_MESSAGES 64
#define FLUSH_AT (1 << 18)
#define WINDOW_WORDS 32 /* 2048 bits */
#define SLOTS 4
#define PARTIALS 16
#define MAX_PIECES 255
#define MAX_GSO_SEGMENTS 64
#define MAX_GSO_BYTES 65000
#define PARTIAL_TTL 1.0
#define FLOW_RING 4096
#define FLOW_SNAP 128
#define GRO_BUF (65536 + 4096)

enum { EV_MESSAGE = 1, EV_ROTATED = 2, EV_CLOSED = 3, EV_PEER = 4, EV_MSGSIZE = 5, EV_DEVICE = 6 };
enum {
    D_BAD_TAG, D_REPLAY, D_NO_SESSION, D_NONCE, D_TOO_BIG, D_DECODE, D_INCOMPLETE,
    D_QUEUE_FULL, D_OFFLOAD, D_DEVICE, D_COUNT
};
static const char *DROP_NAMES[D_COUNT] = {
    "bad_tag", "replay", "no_session", "nonce_exhausted", "too_big", "decode", "incomplete",
    "queue_full", "offload_mismatch", "device",
};

typedef struct Event {
    struct Event *next;
    int kind;
    long long value;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    size_t len;
    unsigned char data[];
} Event;

typedef struct {
    int used, kind; /* kind: 0 current, 1 next (promote on first receive), 2 other */
    uint32_t local_index, remote_index;
    EVP_CIPHER_CTX *send, *recv;
    uint64_t next_counter, limit, top;
    int has_top;
    uint64_t bits[WINDOW_WORDS];
    uint64_t records_sent, bytes_sent, records_received, bytes_received;
} Slot;

typedef struct {
    int used;
    uint32_t receiver, seq;
    int count, got;
    uint64_t have[4];
    size_t total;
    uint64_t stamp;
    double created;
    unsigned char *buf;
} Partial;

typedef struct {
    unsigned char dir, vnet;
    uint32_t len, segs;
    uint16_t snap;
    unsigned char data[FLOW_SNAP];
} FlowRec;

typedef struct {
    PyObject_HEAD
    int tap, sock, stream, vnet, efd, cfd, ep;
    int running, closed, initialised, gso, out_blocked, tap_failed, msgsize_pending;
    unsigned lost_control; /* control events whose malloc failed: bit per kind, re-made by take() */
    long long lost_value[8];
    pthread_t thread;
    pthread_mutex_t lock; /* everything below; never held while blocking */
    Slot slots[SLOTS];
    int tx; /* slot index sealing, -1 none */
    Partial partials[PARTIALS];
    uint64_t pstamp;
    size_t bundle_limit, chunk;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    Event *ev_head, *ev_tail;
    size_t ev_messages;
    int flows;
    FlowRec *flow_ring;
    size_t flow_head, flow_len, flow_lost;
    /* counters */
    unsigned long long records_out, bytes_out, frames_out, records_in, bytes_in, frames_in;
    unsigned long long keepalives_in, keepalives_out, drops[D_COUNT];
    double last_rx, last_tx;
    /* buffers */
    unsigned char *rbuf, *obuf, *ring, *plain, *gro, *piecebuf;
    size_t ostart, opos, rstart, rend; /* stream output pending in obuf[ostart:opos] */
} Pump;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint32_t be32(const unsigned char *p) { return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]; }
static uint64_t be64(const unsigned char *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }
static void put32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }

/* -- events (lock held) ----------------------------------------------------------------- */

static void push_event(Pump *p, int kind, long long value, const void *data, size_t len,
                       const struct sockaddr_storage *addr, socklen_t alen) {
    if (kind == EV_MESSAGE) { /* only handshakes go up, and only a few at a time: the rest is noise */
        const unsigned char *d = data;
        if (!len || len > MAX_HANDSHAKE || (d[0] != T_INITIATION && d[0] != T_RESPONSE) ||
            p->ev_messages >= MAX_QUEUED_MESSAGES) {
            p->drops[D_DECODE]++;
            return;
        }
        p->ev_messages++;
    } else if (kind == EV_MSGSIZE) { /* one pending is enough: Python re-reads the path MTU */
        if (p->msgsize_pending) return;
        p->msgsize_pending = 1;
    }
    Event *e = malloc(sizeof(Event) + len);
    if (!e) {
        if (kind == EV_MESSAGE) {
            p->ev_messages--;
            p->drops[D_DECODE]++;
        } else { /* never lose CLOSED/ROTATED/...: take() re-makes it (PEER: Python re-learns on the next) */
            p->lost_control |= 1u << kind;
            p->lost_value[kind] = value;
        }
        uint64_t one = 1;
        ssize_t w = write(p->efd, &one, 8);
        (void)w;
        return;
    }
    e->next = NULL;
    e->kind = kind;
    e->value = value;
    e->len = len;
    if (len) memcpy(e->data, data, len);
    e->addrlen = addr ? alen : 0;
    if (addr) memcpy(&e->addr, addr, sizeof(*addr));
    if (p->ev_tail) p->ev_tail->next = e; else p->ev_head = e;
    p->ev_tail = e;
    uint64_t one = 1;
    ssize_t w = write(p->efd, &one, 8);
    (void)w;
}

/* -- frame accounting ------------------------------------------------------------------- */

static unsigned gso_segments(const unsigned char *f, size_t n, int vnet) {
    if (!vnet || n < VNET_LEN) return 1;
    unsigned flags = f[0], kind = f[1] & ~0x80u;
    unsigned hdr_len = f[2] | (f[3] << 8), gso_size = f[4] | (f[5] << 8), csum_start = f[6] | (f[7] << 8);
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

static void flow_note(Pump *p, int dir, int vnet, const unsigned char *f, size_t n, unsigned segs) {
    if (!p->flows) return;
    FlowRec *r = &p->flow_ring[(p->flow_head + p->flow_len) % FLOW_RING];
    if (p->flow_len == FLOW_RING) { /* overwrite the oldest */
        p->flow_head = (p->flow_head + 1) % FLOW_RING;
        p->flow_lost++;
    } else {
        p->flow_len++;
    }
    r->dir = dir;
    r->vnet = vnet;
    r->len = (uint32_t)n;
    r->segs = segs;
    r->snap = n < FLOW_SNAP ? n : FLOW_SNAP;
    memcpy(r->data, f, r->snap);
}

/* -- replay window ---------------------------------------------------------------------- */

static int window_check(Slot *s, uint64_t c) {
    if (!s->has_top || c > s->top) return 0;
    uint64_t d = s->top - c;
    if (d >= WINDOW_WORDS * 64) return -1;
    return (s->bits[d / 64] >> (d % 64)) & 1 ? -1 : 0;
}

static void window_shift(Slot *s, uint64_t d) {
    if (d >= WINDOW_WORDS * 64) {
        memset(s->bits, 0, sizeof s->bits);
        return;
    }
    unsigned words = d / 64, bits = d % 64;
    for (int i = WINDOW_WORDS - 1; i >= 0; i--) {
        uint64_t v = 0;
        int src = i - (int)words;
        if (src >= 0) {
            v = s->bits[src] << bits;
            if (bits && src > 0) v |= s->bits[src - 1] >> (64 - bits);
        }
        s->bits[i] = v;
    }
}

static void window_accept(Slot *s, uint64_t c) {
    if (!s->has_top || c > s->top) {
        if (s->has_top) window_shift(s, c - s->top); else memset(s->bits, 0, sizeof s->bits);
        s->top = c;
        s->has_top = 1;
        s->bits[0] |= 1;
        return;
    }
    uint64_t d = s->top - c;
    s->bits[d / 64] |= 1ULL << (d % 64);
}

/* Make dst's window also refuse every counter src's window refuses. */
static void window_merge(Slot *dst, const Slot *src) {
    if (!src->has_top) return;
    if (!dst->has_top) {
        dst->top = src->top;
        dst->has_top = 1;
        memcpy(dst->bits, src->bits, sizeof dst->bits);
        return;
    }
    Slot tmp;
    tmp.top = src->top;
    memcpy(tmp.bits, src->bits, sizeof tmp.bits);
    if (src->top > dst->top) {
        window_shift(dst, src->top - dst->top);
        dst->top = src->top;
    } else if (dst->top > src->top) {
        window_shift(&tmp, dst->top - src->top);
    }
    for (int i = 0; i < WINDOW_WORDS; i++) dst->bits[i] |= tmp.bits[i];
}

/* -- sealing ---------------------------------------------------------------------------- */

static void nonce_of(unsigned char *n, uint64_t c) {
    memset(n, 0, 4);
    put64(n + 4, c);
}

/* Seal payload into out (HDR + ciphertext + TAG); returns the record length, 0 on drop. */
static size_t seal(Pump *p, const unsigned char *payload, size_t n, int flags, unsigned char *out, unsigned frames) {
    if (p->tx < 0) { p->drops[D_NO_SESSION] += frames; return 0; }
    Slot *s = &p->slots[p->tx];
    if (n > MAX_PAYLOAD) { p->drops[D_TOO_BIG] += frames; return 0; }
    if (s->next_counter >= s->limit) { p->drops[D_NONCE] += frames; return 0; }
    uint64_t c = s->next_counter++;
    out[0] = T_DATA;
    out[1] = (unsigned char)flags;
    out[2] = out[3] = 0;
    put32(out + 4, s->remote_index);
    put64(out + 8, c);
    unsigned char nonce[12];
    nonce_of(nonce, c);
    int l = 0, l2 = 0;
    if (!EVP_EncryptInit_ex(s->send, NULL, NULL, NULL, nonce) || !EVP_EncryptUpdate(s->send, NULL, &l, out, HDR) ||
        !EVP_EncryptUpdate(s->send, out + HDR, &l, payload, (int)n) || !EVP_EncryptFinal_ex(s->send, out + HDR + l, &l2) ||
        !EVP_CIPHER_CTX_ctrl(s->send, EVP_CTRL_GCM_GET_TAG, TAG, out + HDR + n)) {
        p->drops[D_DECODE]++;
        return 0;
    }
    s->records_sent++;
    s->bytes_sent += n;
    return HDR + n + TAG;
}

/* -- socket writes ---------------------------------------------------------------------- */

/* Stream output is never waited for: what the socket does not take stays in obuf, the TAP
 * leaves the epoll set and the socket is watched for EPOLLOUT until the queue drains. */
static void set_blocked(Pump *p, int blocked) {
    if (blocked == p->out_blocked) return;
    p->out_blocked = blocked;
    struct epoll_event ev = {.events = EPOLLIN | (blocked ? EPOLLOUT : 0)};
    ev.data.fd = p->sock;
    epoll_ctl(p->ep, EPOLL_CTL_MOD, p->sock, &ev);
    if (p->tap_failed) return;
    if (blocked) {
        epoll_ctl(p->ep, EPOLL_CTL_DEL, p->tap, NULL);
    } else {
        struct epoll_event t = {.events = EPOLLIN};
        t.data.fd = p->tap;
        epoll_ctl(p->ep, EPOLL_CTL_ADD, p->tap, &t);
    }
}

static void mark_closed(Pump *p, int err) {
    if (p->closed) return;
    p->closed = 1;
    push_event(p, EV_CLOSED, err, NULL, 0, NULL, 0);
}

static void stream_flush(Pump *p) {
    while (p->ostart < p->opos) {
        ssize_t w = send(p->sock, p->obuf + p->ostart, p->opos - p->ostart, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p->ostart += (size_t)w;
            p->last_tx = mono();
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_blocked(p, 1);
            return;
        }
        mark_closed(p, w < 0 ? errno : EPIPE);
        p->ostart = p->opos = 0;
        return;
    }
    p->ostart = p->opos = 0;
    set_blocked(p, 0);
}

/* Room for need more bytes at obuf[opos]; compacts the pending output first. */
static int out_room(Pump *p, size_t need) {
    if (p->opos + need <= OBUF_CAP) return 1;
    if (p->ostart) {
        memmove(p->obuf, p->obuf + p->ostart, p->opos - p->ostart);
        p->opos -= p->ostart;
        p->ostart = 0;
    }
    return p->opos + need <= OBUF_CAP;
}

/* 0 sent; -1 no room or no route (drop); -2 EMSGSIZE; -3 the kernel refused the GSO send. */
static int dgram_send(Pump *p, const unsigned char *buf, size_t n, size_t seg) {
    struct iovec iov = {(void *)buf, n};
    struct msghdr m = {0};
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } u;
    m.msg_name = &p->peer;
    m.msg_namelen = p->peerlen;
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (seg && seg < n) {
        memset(u.buf, 0, sizeof u.buf);
        m.msg_control = u.buf;
        m.msg_controllen = sizeof u.buf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT_OPT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t s16 = (uint16_t)seg;
        memcpy(CMSG_DATA(c), &s16, sizeof s16);
    }
    for (;;) {
        ssize_t w = sendmsg(p->sock, &m, MSG_DONTWAIT);
        if (w >= 0) {
            p->last_tx = mono();
            return 0;
        }
        if (errno == EINTR) continue;
        if (errno == EMSGSIZE) {
            push_event(p, EV_MSGSIZE, errno, NULL, 0, NULL, 0);
            return -2;
        }
        if (seg && seg < n && (errno == EINVAL || errno == EIO)) return -3;
        return -1; /* EAGAIN/ENOBUFS (8 MiB buffer full), unreachable: UDP may lose it */
    }
}

/* Send pieces [0, count) laid out every seg bytes in o (the last one ends at pos). */
static int dgram_pieces(Pump *p, const unsigned char *o, size_t pos, size_t count, size_t seg) {
    size_t b = 0;
    if (p->gso) { /* the kernel takes at most MAX_GSO_SEGMENTS pieces and MAX_GSO_BYTES per send */
        size_t per = MAX_GSO_BYTES / seg;
        if (per > MAX_GSO_SEGMENTS) per = MAX_GSO_SEGMENTS;
        if (per < 1) per = 1;
        for (; b < count; b += per) {
            size_t e = b + per < count ? b + per : count;
            size_t from = b * seg, to = e == count ? pos : e * seg;
            int r = dgram_send(p, o + from, to - from, e - b > 1 ? seg : 0);
            if (r == -3) { /* GSO refused on this path (PMTU below seg, xfrm): piece by piece from now on */
                p->gso = 0;
                push_event(p, EV_MSGSIZE, EINVAL, NULL, 0, NULL, 0);
                break;
            }
            if (r < 0) return r;
        }
        if (b >= count) return 0;
    }
    for (; b < count; b++) {
        size_t from = b * seg, to = b + 1 == count ? pos : from + seg;
        int r = dgram_send(p, o + from, to - from, 0);
        if (r < 0) return r;
    }
    return 0;
}

/* Send one sealed record (in rec, length n) on the datagram socket, split into pieces if needed. */
static void dgram_record(Pump *p, unsigned char *rec, size_t n, unsigned count_frames) {
    size_t chunk = p->chunk;
    int r;
    if (!p->peerlen) {
        p->drops[D_QUEUE_FULL] += count_frames;
        return;
    }
    if (!chunk || n <= chunk + PH) {
        r = dgram_send(p, rec, n, 0);
    } else {
        size_t count = (n + chunk - 1) / chunk;
        if (count > MAX_PIECES) {
            p->drops[D_TOO_BIG] += count_frames;
            return;
        }
        uint32_t receiver = be32(rec + 4), seq = (uint32_t)be64(rec + 8);
        unsigned char *o = p->piecebuf;
        size_t pos = 0;
        for (size_t i = 0; i < count; i++) {
            size_t off = i * chunk, len = n - off < chunk ? n - off : chunk;
            o[pos] = T_PIECE;
            o[pos + 1] = (unsigned char)i;
            o[pos + 2] = (unsigned char)count;
            o[pos + 3] = 0;
            put32(o + pos + 4, receiver);
            put32(o + pos + 8, seq);
            put32(o + pos + 12, (uint32_t)off);
            memcpy(o + pos + PH, rec + off, len);
            pos += PH + len;
        }
        r = dgram_pieces(p, o, pos, count, PH + chunk);
    }
    if (r < 0) p->drops[r == -2 ? D_TOO_BIG : D_QUEUE_FULL] += count_frames;
}

/* Seal payload and send it (stream: queued in obuf, flushed at FLUSH_AT; datagram: right away).
 * Returns 1 when the record was sealed. */
static int send_payload(Pump *p, const unsigned char *payload, size_t n, int flags, unsigned count, size_t nbytes,
                        unsigned segs) {
    if (p->stream) {
        if (p->closed || !out_room(p, 4 + n + OVERHEAD)) {
            p->drops[D_QUEUE_FULL] += count;
            return 0;
        }
        size_t r = seal(p, payload, n, flags, p->obuf + p->opos + 4, count);
        if (!r) return 0;
        put32(p->obuf + p->opos, (uint32_t)r);
        p->opos += 4 + r;
        if (p->opos - p->ostart >= FLUSH_AT && !p->out_blocked) stream_flush(p);
    } else {
        unsigned char *rec = p->obuf;
        size_t r = seal(p, payload, n, flags, rec, count);
        if (!r) return 0;
        dgram_record(p, rec, r, count);
    }
    p->records_out++;
    p->bytes_out += nbytes;
    p->frames_out += segs;
    return 1;
}

/* The bundle at buf[0:pos]: count frames of nbytes behind u16 lengths; a lone frame goes without its length. */
static void send_bundle(Pump *p, unsigned char *buf, size_t pos, unsigned count, size_t nbytes, unsigned segs) {
    int flags = p->vnet ? FLAG_VNET : 0;
    if (count > 1) send_payload(p, buf, pos, flags | FLAG_BUNDLE, count, nbytes, segs);
    else send_payload(p, buf + 2, nbytes, flags, 1, nbytes, segs);
}

static void tap_failed(Pump *p, int err) {
    p->drops[D_DEVICE]++;
    p->tap_failed = 1;
    epoll_ctl(p->ep, EPOLL_CTL_DEL, p->tap, NULL);
    push_event(p, EV_DEVICE, err, NULL, 0, NULL, 0);
}

/* Drain the TAP: small frames are bundled (u16 length prefix), big ones go alone. Never waits
 * for more frames than are queued, so bundling adds no latency. */
static void on_tap(Pump *p) {
    unsigned char *buf = p->rbuf;
    size_t pos = 0, nbytes = 0, limit = p->bundle_limit;
    unsigned count = 0, segs = 0;
    for (int i = 0; i < READ_BATCH && !p->out_blocked && !p->closed; i++) {
        ssize_t n = read(p->tap, buf + pos + 2, MAX_PAYLOAD);
        if (n <= 0) { /* a TAP never reads empty: 0 is a closed test device */
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) tap_failed(p, n ? errno : EPIPE);
            break;
        }
        if (n >= MAX_PAYLOAD) {
            p->drops[D_TOO_BIG]++;
            continue;
        }
        unsigned char *f = buf + pos + 2;
        unsigned s = (p->vnet && n > 1 && f[1]) ? gso_segments(f, (size_t)n, 1) : 1;
        flow_note(p, 1, p->vnet, f, (size_t)n, s);
        if (n > BUNDLE_FRAME_MAX) {
            if (count) send_bundle(p, buf, pos, count, nbytes, segs);
            send_payload(p, f, (size_t)n, p->vnet ? FLAG_VNET : 0, 1, (size_t)n, s);
            pos = nbytes = 0;
            count = segs = 0;
        } else {
            buf[pos] = (unsigned char)(n >> 8);
            buf[pos + 1] = (unsigned char)n;
            pos += 2 + (size_t)n;
            count++;
            nbytes += (size_t)n;
            segs += s;
            if (pos >= limit) {
                send_bundle(p, buf, pos, count, nbytes, segs);
                pos = nbytes = 0;
                count = segs = 0;
            }
        }
    }
    if (count) send_bundle(p, buf, pos, count, nbytes, segs);
    if (p->stream && !p->out_blocked) stream_flush(p);
}

/* -- receiving -------------------------------------------------------------------------- */

static void tap_write(Pump *p, const unsigned char *f, size_t n, int flags) {
    int vnet = flags & FLAG_VNET ? 1 : 0;
    if (vnet && n < VNET_LEN) { p->drops[D_DECODE]++; return; }
    ssize_t w;
    if (vnet == p->vnet) {
        w = write(p->tap, f, n);
    } else if (p->vnet) { /* plain frame into a VNET_HDR TAP: "no offload" header */
        static const unsigned char zero[VNET_LEN];
        struct iovec iov[2] = {{(void *)zero, VNET_LEN}, {(void *)f, n}};
        w = writev(p->tap, iov, 2);
    } else if (!f[1] && !(f[0] & 1)) { /* no GSO, checksum complete */
        w = write(p->tap, f + VNET_LEN, n - VNET_LEN);
    } else {
        p->drops[D_OFFLOAD]++;
        return;
    }
    if (w < 0) {
        p->drops[errno == EAGAIN || errno == EWOULDBLOCK ? D_QUEUE_FULL : D_DEVICE]++;
        return;
    }
    unsigned segs = (vnet && f[1]) ? gso_segments(f, n, 1) : 1;
    p->bytes_in += n;
    p->frames_in += segs;
    flow_note(p, 2, vnet, f, n, segs);
}

static void deliver(Pump *p, const unsigned char *pl, size_t n, int flags) {
    if (!n) { p->keepalives_in++; return; }
    p->records_in++;
    if (!(flags & FLAG_BUNDLE)) { tap_write(p, pl, n, flags); return; }
    size_t pos = 0;
    while (pos < n) {
        if (pos + 2 > n) { p->drops[D_DECODE]++; return; }
        size_t end = pos + 2 + ((size_t)pl[pos] << 8 | pl[pos + 1]);
        if (end > n) { p->drops[D_DECODE]++; return; }
        tap_write(p, pl + pos + 2, end - pos - 2, flags);
        pos = end;
    }
}

static Slot *slot_by_index(Pump *p, uint32_t idx) {
    for (int i = 0; i < SLOTS; i++)
        if (p->slots[i].used && p->slots[i].local_index == idx) return &p->slots[i];
    return NULL;
}

/* Open one DATA record; 1 if it authenticated (the sender is genuine), 0 otherwise. */
static int open_record(Pump *p, const unsigned char *rec, size_t n) {
    if (n < OVERHEAD) { p->drops[D_DECODE]++; return 0; }
    int flags = rec[1];
    Slot *s = slot_by_index(p, be32(rec + 4));
    if (!s) { p->drops[D_NO_SESSION]++; return 0; }
    uint64_t c = be64(rec + 8);
    if (window_check(s, c) < 0) { p->drops[D_REPLAY]++; return 0; }
    size_t m = n - OVERHEAD;
    unsigned char nonce[12];
    nonce_of(nonce, c);
    int l = 0, l2 = 0;
    if (!EVP_DecryptInit_ex(s->recv, NULL, NULL, NULL, nonce) || !EVP_DecryptUpdate(s->recv, NULL, &l, rec, HDR) ||
        !EVP_DecryptUpdate(s->recv, p->plain, &l, rec + HDR, (int)m) ||
        !EVP_CIPHER_CTX_ctrl(s->recv, EVP_CTRL_GCM_SET_TAG, TAG, (void *)(rec + n - TAG)) ||
        EVP_DecryptFinal_ex(s->recv, p->plain + l, &l2) <= 0) {
        p->drops[D_BAD_TAG]++;
        return 0;
    }
    window_accept(s, c);
    s->records_received++;
    s->bytes_received += m;
    p->last_rx = mono();
    if (s->kind == 1) { /* first record under the next session: it becomes current */
        for (int i = 0; i < SLOTS; i++)
            if (p->slots[i].used && p->slots[i].kind == 0) p->slots[i].kind = 2;
        s->kind = 0;
        p->tx = (int)(s - p->slots);
        push_event(p, EV_ROTATED, s->local_index, NULL, 0, NULL, 0);
    }
    deliver(p, p->plain, m, flags);
    return 1;
}

static void stream_parse(Pump *p) {
    unsigned char *b = p->ring;
    size_t start = p->rstart, end = p->rend;
    while (end - start >= 4) {
        uint32_t ln = be32(b + start);
        if (ln == 0 || ln > MAX_RECORD) {
            p->drops[D_DECODE]++;
            mark_closed(p, EPROTO);
            p->rstart = p->rend = 0;
            return;
        }
        size_t s = start + 4;
        if (end - s < ln) break;
        start = s + ln;
        if (b[s] == T_DATA) open_record(p, b + s, ln);
        else push_event(p, EV_MESSAGE, 0, b + s, ln, NULL, 0);
    }
    if (start == end) start = end = 0;
    p->rstart = start;
    p->rend = end;
}

static void on_stream(Pump *p) {
    for (int i = 0; i < 16; i++) {
        if (RX_RING - p->rend < MAX_RECORD + 4) {
            memmove(p->ring, p->ring + p->rstart, p->rend - p->rstart);
            p->rend -= p->rstart;
            p->rstart = 0;
        }
        ssize_t k = recv(p->sock, p->ring + p->rend, RX_RING - p->rend, 0);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            mark_closed(p, k == 0 ? 0 : errno);
            return;
        }
        if (k < 0) return;
        p->rend += (size_t)k;
        stream_parse(p);
        if (p->closed) return;
    }
}

static void note_peer(Pump *p, const struct sockaddr_storage *a, socklen_t alen) {
    if (alen == p->peerlen && !memcmp(a, &p->peer, alen)) return;
    memcpy(&p->peer, a, sizeof(*a));
    p->peerlen = alen;
    push_event(p, EV_PEER, 0, NULL, 0, a, alen);
}

static void on_piece(Pump *p, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen) {
    if (n <= PH) { p->drops[D_DECODE]++; return; }
    int idx = d[1], count = d[2];
    uint32_t receiver = be32(d + 4), seq = be32(d + 8), off = be32(d + 12);
    size_t len = n - PH;
    if (count < 2 || idx >= count || off + len > MAX_RECORD) { p->drops[D_DECODE]++; return; }
    Partial *q = NULL, *free_q = NULL, *oldest = NULL;
    double now = mono();
    for (int i = 0; i < PARTIALS; i++) {
        Partial *c = &p->partials[i];
        if (c->used && now - c->created > PARTIAL_TTL) { /* a piece never came */
            c->used = 0;
            p->drops[D_INCOMPLETE]++;
        }
        if (c->used && c->receiver == receiver && c->seq == seq) { q = c; break; }
        if (!c->used && !free_q) free_q = c;
        if (c->used && (!oldest || c->stamp < oldest->stamp)) oldest = c;
    }
    if (!q) {
        q = free_q;
        if (!q) { q = oldest; p->drops[D_INCOMPLETE]++; }
        q->used = 1;
        q->receiver = receiver;
        q->seq = seq;
        q->count = count;
        q->got = 0;
        q->total = 0;
        memset(q->have, 0, sizeof q->have);
        q->stamp = ++p->pstamp;
        q->created = mono();
    }
    if (q->count != count) { p->drops[D_DECODE]++; return; } /* this piece is wrong, not the record */
    if ((q->have[idx / 64] >> (idx % 64)) & 1) return; /* duplicate piece */
    q->have[idx / 64] |= 1ULL << (idx % 64);
    q->got++;
    memcpy(q->buf + off, d + PH, len);
    if (idx == count - 1) q->total = off + len;
    if (q->got == count && q->total) {
        q->used = 0;
        if (q->buf[0] == T_DATA && (uint32_t)be64(q->buf + 8) == seq && be32(q->buf + 4) == receiver) {
            if (open_record(p, q->buf, q->total)) note_peer(p, a, alen);
        } else {
            p->drops[D_DECODE]++;
        }
    }
}

static void on_datagram(Pump *p, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen) {
    if (!n) return;
    if (d[0] == T_DATA) {
        if (open_record(p, d, n)) note_peer(p, a, alen);
    } else if (d[0] == T_PIECE) {
        on_piece(p, d, n, a, alen);
    } else {
        push_event(p, EV_MESSAGE, 0, d, n, a, alen);
    }
}

static void on_udp(Pump *p) {
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage a;
        struct iovec iov = {p->gro, GRO_BUF};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } u;
        struct msghdr m = {&a, sizeof a, &iov, 1, u.buf, sizeof u.buf, 0};
        ssize_t k = recvmsg(p->sock, &m, 0);
        if (k < 0) return;
        size_t seg = (size_t)k;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO_OPT) {
                int g;
                memcpy(&g, CMSG_DATA(c), sizeof g);
                if (g > 0) seg = (size_t)g;
            }
        for (size_t off = 0; off < (size_t)k; off += seg) {
            size_t len = (size_t)k - off < seg ? (size_t)k - off : seg;
            on_datagram(p, p->gro + off, len, &a, m.msg_namelen);
        }
    }
}

static void *run(void *arg) {
    Pump *p = arg;
    struct epoll_event evs[4];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the interpreter's business */
    if (p->stream && p->rend > p->rstart) {
        pthread_mutex_lock(&p->lock);
        stream_parse(p);
        pthread_mutex_unlock(&p->lock);
    }
    for (;;) {
        int n = epoll_wait(p->ep, evs, 4, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            break;
        }
        int stop = 0;
        pthread_mutex_lock(&p->lock);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t what = evs[i].events;
            if (fd == p->cfd) {
                stop = 1;
            } else if (p->closed) {
                continue;
            } else if (fd == p->tap) {
                if (!p->tap_failed && !p->out_blocked) on_tap(p);
            } else if (p->stream) {
                if (what & EPOLLOUT) stream_flush(p);
                if (what & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_stream(p);
            } else {
                on_udp(p);
            }
        }
        int done = p->closed && p->stream;
        pthread_mutex_unlock(&p->lock);
        if (stop || done) break;
    }
    return NULL;
}

/* -- Python type ------------------------------------------------------------------------ */

/* The pump lock, taken and released with the GIL released all along: never wait for the GIL while
 * the forwarding thread may be waiting for the lock. Nothing between the two touches Python. */
#define NOGIL_LOCK(p, ts)                                                                                               \
    PyThreadState *ts = PyEval_SaveThread();                                                                           \
    pthread_mutex_lock(&(p)->lock)
#define NOGIL_UNLOCK(p, ts)                                                                                             \
    pthread_mutex_unlock(&(p)->lock);                                                                                  \
    PyEval_RestoreThread(ts)

static void free_slot(Slot *s) {
    if (s->send) EVP_CIPHER_CTX_free(s->send);
    if (s->recv) EVP_CIPHER_CTX_free(s->recv);
    memset(s, 0, sizeof(*s));
}

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p) p->efd = p->cfd = p->ep = p->tap = p->sock = -1; /* nothing of ours to close yet */
    return (PyObject *)p;
}

static int check_ready(Pump *p) {
    if (p->initialised) return 0;
    PyErr_SetString(PyExc_RuntimeError, "Pump.__init__ was not run");
    return -1;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    static char *names[] = {"tap_fd", "sock_fd", "stream", "vnet", "bundle_limit", "chunk", "flows", "gso", NULL};
    Py_ssize_t bundle = 32 * 1024, chunk = 0;
    int flows = 0, gso = 1, tap, sock, stream, vnet;
    if (p->initialised || p->rbuf || p->efd >= 0) { /* also after a failed attempt: its buffers are ours */
        PyErr_SetString(PyExc_RuntimeError, "a Pump is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iipp|nnpp", names, &tap, &sock, &stream, &vnet, &bundle, &chunk, &flows,
                                     &gso))
        return -1;
    /* a bundle (frames up to BUNDLE_FRAME_MAX appended until the limit is passed) must fit one record */
    if (bundle < 1024 || bundle > MAX_PAYLOAD - BUNDLE_FRAME_MAX - 2) {
        PyErr_SetString(PyExc_ValueError, "bundle_limit out of range");
        return -1;
    }
    if (chunk < 0 || chunk > 65535) {
        PyErr_SetString(PyExc_ValueError, "chunk out of range");
        return -1;
    }
    if (tap < 0 || sock < 0) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    p->tap = tap;
    p->sock = sock;
    p->stream = stream;
    p->vnet = vnet;
    p->bundle_limit = (size_t)bundle;
    p->chunk = (size_t)chunk;
    p->flows = flows;
    p->gso = gso;
    p->tx = -1;
    p->rbuf = malloc(MAX_PAYLOAD + MAX_PAYLOAD + 2);
    p->obuf = malloc(OBUF_CAP > MAX_RECORD ? OBUF_CAP : MAX_RECORD);
    p->ring = p->stream ? malloc(RX_RING) : NULL;
    p->plain = malloc(MAX_PAYLOAD);
    p->gro = p->stream ? NULL : malloc(GRO_BUF);
    p->piecebuf = p->stream ? NULL : malloc(MAX_RECORD + MAX_PIECES * PH);
    p->flow_ring = flows ? calloc(FLOW_RING, sizeof(FlowRec)) : NULL;
    if (!p->rbuf || !p->obuf || !p->plain || (p->stream && !p->ring) || (!p->stream && (!p->gro || !p->piecebuf)) ||
        (flows && !p->flow_ring)) {
        PyErr_NoMemory();
        return -1;
    }
    if (!p->stream)
        for (int i = 0; i < PARTIALS; i++)
            if (!(p->partials[i].buf = malloc(MAX_RECORD))) {
                PyErr_NoMemory();
                return -1;
            }
    for (int i = 0; i < 2; i++) { /* the thread must never block in read/recv/send */
        int fd = i ? sock : tap, fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->cfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->ep = epoll_create1(EPOLL_CLOEXEC);
    if (p->efd < 0 || p->cfd < 0 || p->ep < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int fds[3] = {p->cfd, p->tap, p->sock};
    for (int i = 0; i < 3; i++) {
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.fd = fds[i];
        if (epoll_ctl(p->ep, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    if (!p->stream) {
        int one = 1;
        setsockopt(p->sock, SOL_UDP, UDP_GRO_OPT, &one, sizeof one);
    }
    pthread_mutex_init(&p->lock, NULL);
    p->initialised = 1;
    return 0;
}

static void stop_thread(Pump *p) {
    if (!p->running) return;
    uint64_t one = 1;
    ssize_t w = write(p->cfd, &one, 8);
    (void)w;
    Py_BEGIN_ALLOW_THREADS pthread_join(p->thread, NULL);
    Py_END_ALLOW_THREADS p->running = 0;
}

static void Pump_dealloc(Pump *p) {
    stop_thread(p);
    for (int i = 0; i < SLOTS; i++) free_slot(&p->slots[i]);
    for (int i = 0; i < PARTIALS; i++) free(p->partials[i].buf);
    for (Event *e = p->ev_head, *n; e; e = n) {
        n = e->next;
        free(e);
    }
    free(p->rbuf);
    free(p->obuf);
    free(p->ring);
    free(p->plain);
    free(p->gro);
    free(p->piecebuf);
    free(p->flow_ring);
    if (p->efd >= 0) close(p->efd);
    if (p->cfd >= 0) close(p->cfd);
    if (p->ep >= 0) close(p->ep);
    if (p->initialised) pthread_mutex_destroy(&p->lock);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Pump_start(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    if (p->running) Py_RETURN_NONE;
    uint64_t junk;
    ssize_t r = read(p->cfd, &junk, 8); /* a stop request of an earlier run */
    (void)r;
    if (pthread_create(&p->thread, NULL, run, p) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    p->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    stop_thread(p);
    NOGIL_LOCK(p, ts);
    if (p->stream && !p->closed) stream_flush(p); /* best effort, never waits */
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
}

static EVP_CIPHER_CTX *make_ctx(const char *key, Py_ssize_t n, int enc) {
    if (n != 32) return NULL;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c) return NULL;
    int ok = enc ? EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, (const unsigned char *)key, NULL)
                 : EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, (const unsigned char *)key, NULL);
    if (!ok) {
        EVP_CIPHER_CTX_free(c);
        return NULL;
    }
    return c;
}

/* Replace the session table with fresh (lock held). A session the pump already has keeps its live
 * state: the larger send counter (a nonce is never reused), the merged replay window, its counters,
 * and a promotion Python has not heard of yet. */
static void install_sessions(Pump *p, Slot *fresh, int tx) {
    int promoted = -1;
    for (int i = 0; i < SLOTS; i++) {
        Slot *s = &fresh[i];
        if (!s->used) continue;
        Slot *old = slot_by_index(p, s->local_index);
        if (!old || old->remote_index != s->remote_index) continue;
        window_merge(s, old);
        if (old->next_counter > s->next_counter) s->next_counter = old->next_counter;
        s->records_sent = old->records_sent;
        s->bytes_sent = old->bytes_sent;
        s->records_received = old->records_received;
        s->bytes_received = old->bytes_received;
        if (old->kind == 0 && s->kind == 1) promoted = i; /* EV_ROTATED is still on its way to Python */
    }
    if (promoted >= 0) {
        for (int i = 0; i < SLOTS; i++)
            if (fresh[i].used && fresh[i].kind == 0) fresh[i].kind = 2;
        fresh[promoted].kind = 0;
        tx = promoted;
    }
    for (int i = 0; i < SLOTS; i++) free_slot(&p->slots[i]);
    memcpy(p->slots, fresh, sizeof(Slot) * SLOTS);
    p->tx = tx;
}

/* set_sessions([(local_index, remote_index, send_key, recv_key, next_counter, limit, kind, top, bits), ...])
 * kind: 0 seals, 1 becomes current on its first record, 2 opens only; top: highest counter received
 * (-1: none); bits: the replay window, 256 bytes little-endian. A refused table changes nothing. */
static PyObject *Pump_set_sessions(Pump *p, PyObject *arg) {
    if (check_ready(p) < 0) return NULL;
    PyObject *seq = PySequence_Fast(arg, "sessions must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > SLOTS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many sessions");
        return NULL;
    }
    Slot fresh[SLOTS];
    memset(fresh, 0, sizeof fresh);
    int tx = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long li, ri;
        const char *sk, *rk, *wb;
        Py_ssize_t skn, rkn, wbn;
        unsigned long long nc, lim;
        long long top;
        int kind;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kky#y#KKiLy#", &li, &ri, &sk, &skn, &rk, &rkn, &nc, &lim,
                              &kind, &top, &wb, &wbn))
            goto fail;
        if (wbn != WINDOW_WORDS * 8) {
            PyErr_SetString(PyExc_ValueError, "replay window must be 256 bytes");
            goto fail;
        }
        if (kind < 0 || kind > 2 || (kind == 0 && tx >= 0)) {
            PyErr_SetString(PyExc_ValueError, "session kind must be 0 (one at most), 1 or 2");
            goto fail;
        }
        Slot *s = &fresh[i];
        s->used = 1;
        s->kind = kind;
        s->local_index = (uint32_t)li;
        s->remote_index = (uint32_t)ri;
        s->next_counter = nc;
        s->limit = lim;
        s->has_top = top >= 0;
        s->top = top >= 0 ? (uint64_t)top : 0;
        for (int w = 0; w < WINDOW_WORDS; w++) {
            uint64_t v = 0;
            for (int b = 7; b >= 0; b--) v = (v << 8) | (unsigned char)wb[w * 8 + b];
            s->bits[w] = v;
        }
        s->send = make_ctx(sk, skn, 1);
        s->recv = make_ctx(rk, rkn, 0);
        if (!s->send || !s->recv) {
            PyErr_SetString(PyExc_ValueError, "bad session key");
            goto fail;
        }
        if (kind == 0) tx = (int)i;
    }
    Py_DECREF(seq);
    NOGIL_LOCK(p, ts);
    install_sessions(p, fresh, tx);
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    for (int i = 0; i < SLOTS; i++) free_slot(&fresh[i]);
    return NULL;
}

static PyObject *Pump_session_counters(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    Slot copy[SLOTS];
    NOGIL_LOCK(p, ts);
    memcpy(copy, p->slots, sizeof copy);
    NOGIL_UNLOCK(p, ts);
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (int i = 0; i < SLOTS; i++) {
        Slot *s = &copy[i];
        if (!s->used) continue;
        PyObject *k = PyLong_FromUnsignedLong(s->local_index);
        PyObject *v = Py_BuildValue("(KKKKK)", (unsigned long long)s->next_counter, (unsigned long long)s->records_sent,
                                    (unsigned long long)s->bytes_sent, (unsigned long long)s->records_received,
                                    (unsigned long long)s->bytes_received);
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyObject *addr_tuple(const struct sockaddr_storage *a, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (!len) Py_RETURN_NONE;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)a;
        inet_ntop(AF_INET, &s->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(s->sin_port));
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)a;
        inet_ntop(AF_INET6, &s->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(s->sin6_port), ntohl(s->sin6_flowinfo), s->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* take() -> [(kind, value, bytes, addr), ...]: the queued events, oldest first. */
static PyObject *Pump_take(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    uint64_t junk;
    ssize_t r = read(p->efd, &junk, 8);
    (void)r;
    NOGIL_LOCK(p, ts);
    Event *e = p->ev_head;
    unsigned lost = p->lost_control;
    long long lost_value[8];
    memcpy(lost_value, p->lost_value, sizeof lost_value);
    p->lost_control = 0;
    p->ev_head = p->ev_tail = NULL;
    p->ev_messages = 0;
    p->msgsize_pending = 0;
    NOGIL_UNLOCK(p, ts);
    PyObject *out = PyList_New(0);
    while (e) {
        Event *n = e->next;
        if (out) {
            PyObject *addr = addr_tuple(&e->addr, e->addrlen);
            PyObject *t = addr ? Py_BuildValue("(iLy#N)", e->kind, e->value, (const char *)e->data, (Py_ssize_t)e->len, addr)
                               : NULL;
            if (!t || PyList_Append(out, t) < 0) Py_CLEAR(out);
            Py_XDECREF(t);
        }
        free(e);
        e = n;
    }
    for (int kind = EV_ROTATED; out && kind <= EV_DEVICE; kind++) {
        if (!(lost & (1u << kind)) || kind == EV_PEER) continue;
        PyObject *t = Py_BuildValue("(iLy#O)", kind, lost_value[kind], "", (Py_ssize_t)0, Py_None);
        if (!t || PyList_Append(out, t) < 0) Py_CLEAR(out);
        Py_XDECREF(t);
    }
    return out;
}

static PyObject *Pump_flows(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    if (!p->flows) return PyList_New(0);
    NOGIL_LOCK(p, ts);
    size_t n = p->flow_len, head = p->flow_head;
    FlowRec *copy = n ? malloc(n * sizeof(FlowRec)) : NULL;
    if (copy) {
        for (size_t i = 0; i < n; i++) copy[i] = p->flow_ring[(head + i) % FLOW_RING];
        p->flow_len = 0;
        p->flow_head = 0;
    }
    NOGIL_UNLOCK(p, ts);
    if (n && !copy) return PyErr_NoMemory();
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out && i < n; i++) {
        FlowRec *f = &copy[i];
        PyObject *t = Py_BuildValue("(iiIIy#)", f->dir, f->vnet, f->len, f->segs, (const char *)f->data, (Py_ssize_t)f->snap);
        if (!t || PyList_Append(out, t) < 0) Py_CLEAR(out);
        Py_XDECREF(t);
    }
    free(copy);
    return out;
}

static PyObject *Pump_stats(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    unsigned long long c[8], drops[D_COUNT];
    double last_rx, last_tx;
    int closed, gso, out_blocked;
    unsigned long long flow_lost;
    NOGIL_LOCK(p, ts);
    unsigned long long src[8] = {p->records_out, p->bytes_out, p->frames_out, p->records_in,
                                 p->bytes_in, p->frames_in, p->keepalives_in, p->keepalives_out};
    memcpy(c, src, sizeof c);
    memcpy(drops, p->drops, sizeof drops);
    last_rx = p->last_rx;
    last_tx = p->last_tx;
    closed = p->closed;
    gso = p->gso;
    out_blocked = p->out_blocked;
    flow_lost = p->flow_lost;
    NOGIL_UNLOCK(p, ts);
    PyObject *dd = PyDict_New();
    for (int i = 0; dd && i < D_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(drops[i]);
        if (!v || PyDict_SetItemString(dd, DROP_NAMES[i], v) < 0) Py_CLEAR(dd);
        Py_XDECREF(v);
    }
    if (!dd) return NULL;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsdsdsNsisisisK}", "records_out", c[0], "bytes_out", c[1], "frames_out", c[2],
                         "records_in", c[3], "bytes_in", c[4], "frames_in", c[5], "keepalives_in", c[6],
                         "keepalives_out", c[7], "last_rx", last_rx, "last_tx", last_tx, "drops", dd, "closed", closed,
                         "gso", gso, "output_blocked", out_blocked, "flows_lost", flow_lost);
}

/* send_message(msg) -> bool: a handshake message on the link, after the records already sealed.
 * Stream: queued behind them (never waits); datagram: sent to the peer. */
static PyObject *Pump_send_message(Pump *p, PyObject *arg) {
    if (check_ready(p) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&p->lock);
    if (p->stream) {
        if (!p->closed && b.len <= MAX_RECORD && out_room(p, 4 + (size_t)b.len)) {
            put32(p->obuf + p->opos, (uint32_t)b.len);
            memcpy(p->obuf + p->opos + 4, b.buf, (size_t)b.len);
            p->opos += 4 + (size_t)b.len;
            if (!p->out_blocked) stream_flush(p);
            ok = !p->closed;
        }
    } else {
        ok = p->peerlen && dgram_send(p, b.buf, (size_t)b.len, 0) == 0;
    }
    pthread_mutex_unlock(&p->lock);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

/* send_keepalive() -> bool: an empty record under the current session. */
static PyObject *Pump_send_keepalive(Pump *p, PyObject *unused) {
    if (check_ready(p) < 0) return NULL;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&p->lock);
    ok = send_payload(p, (const unsigned char *)"", 0, p->vnet ? FLAG_VNET : 0, 0, 0, 0);
    if (ok) {
        p->records_out--; /* a keepalive is not a record of frames */
        p->keepalives_out++;
    }
    if (p->stream && !p->out_blocked && !p->closed) stream_flush(p);
    pthread_mutex_unlock(&p->lock);
    Py_END_ALLOW_THREADS return PyBool_FromLong(ok);
}

/* set_peer(host, port[, flowinfo, scope_id]): datagram: where records go. */
static PyObject *Pump_set_peer(Pump *p, PyObject *args) {
    if (check_ready(p) < 0) return NULL;
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope = 0;
    if (!PyArg_ParseTuple(args, "si|II", &host, &port, &flowinfo, &scope)) return NULL;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    struct sockaddr_storage a;
    memset(&a, 0, sizeof a);
    socklen_t len;
    struct sockaddr_in *s4 = (void *)&a;
    struct sockaddr_in6 *s6 = (void *)&a;
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        len = sizeof *s4;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        s6->sin6_flowinfo = htonl(flowinfo);
        s6->sin6_scope_id = scope;
        len = sizeof *s6;
    } else {
        PyErr_SetString(PyExc_ValueError, "peer host must be an IP address");
        return NULL;
    }
    NOGIL_LOCK(p, ts);
    memcpy(&p->peer, &a, sizeof a);
    p->peerlen = len;
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
}

static PyObject *Pump_set_chunk(Pump *p, PyObject *arg) {
    if (check_ready(p) < 0) return NULL;
    Py_ssize_t c = PyLong_AsSsize_t(arg);
    if (c == -1 && PyErr_Occurred()) return NULL;
    if (c < 0 || c > 65535) {
        PyErr_SetString(PyExc_ValueError, "chunk out of range");
        return NULL;
    }
    NOGIL_LOCK(p, ts);
    p->chunk = (size_t)c;
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
}

/* feed(data): stream bytes already read from the socket (before start()), parsed first. */
static PyObject *Pump_feed(Pump *p, PyObject *arg) {
    if (check_ready(p) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    if (p->running || !p->stream || (size_t)b.len > RX_RING - p->rend) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "feed is for a stream pump before start()");
        return NULL;
    }
    memcpy(p->ring + p->rend, b.buf, (size_t)b.len);
    p->rend += (size_t)b.len;
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *Pump_event_fd(Pump *p, void *unused) { return PyLong_FromLong(p->efd); }

static PyMethodDef Pump_methods[] = {
    {"start", (PyCFunction)Pump_start, METH_NOARGS, "Start the forwarding thread."},
    {"stop", (PyCFunction)Pump_stop, METH_NOARGS, "Stop and join the forwarding thread (idempotent)."},
    {"set_sessions", (PyCFunction)Pump_set_sessions, METH_O, "Install the session table."},
    {"session_counters", (PyCFunction)Pump_session_counters, METH_NOARGS, "Per-session counters by local index."},
    {"take", (PyCFunction)Pump_take, METH_NOARGS, "Queued events: [(kind, value, bytes, addr)]."},
    {"flows", (PyCFunction)Pump_flows, METH_NOARGS, "Frame samples since the last call: [(dir, vnet, len, segments, head)]."},
    {"stats", (PyCFunction)Pump_stats, METH_NOARGS, "Counters."},
    {"send_message", (PyCFunction)Pump_send_message, METH_O, "Send a handshake message on the link."},
    {"send_keepalive", (PyCFunction)Pump_send_keepalive, METH_NOARGS, "Seal and send an empty record."},
    {"feed", (PyCFunction)Pump_feed, METH_O, "Stream bytes read before start()."},
    {"set_peer", (PyCFunction)Pump_set_peer, METH_VARARGS, "Datagram: where records go."},
    {"set_chunk", (PyCFunction)Pump_set_chunk, METH_O, "Datagram: record bytes per piece."},
    {NULL}};

static PyGetSetDef Pump_getset[] = {{"event_fd", (getter)Pump_event_fd, NULL, "Readable when events are queued.", NULL},
                                    {NULL}};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vna_agent.dataplane._fastpath.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Native forwarding thread for one established tunnel link.",
    .tp_new = Pump_new,
    .tp_init = (initproc)Pump_init,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", "Native tunnel fast path.", -1, NULL};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&PumpType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) return NULL;
    PyModule_AddIntConstant(m, "EV_MESSAGE", EV_MESSAGE);
    PyModule_AddIntConstant(m, "EV_ROTATED", EV_ROTATED);
    PyModule_AddIntConstant(m, "EV_CLOSED", EV_CLOSED);
    PyModule_AddIntConstant(m, "EV_PEER", EV_PEER);
    PyModule_AddIntConstant(m, "EV_MSGSIZE", EV_MSGSIZE);
    PyModule_AddIntConstant(m, "EV_DEVICE", EV_DEVICE);
    return m;
}
