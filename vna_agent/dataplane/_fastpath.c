/*
 * Native fast path of an established tunnel session (see fastpath.py).
 *
 * A Pump owns one thread that moves frames between a TAP and the tunnel's
 * connected socket without the GIL: TAP frames are bundled and sealed into
 * AES-256-GCM records exactly as record.py/tunnel.py do, written to the TCP
 * stream (u32 length framing) or the UDP socket (one datagram, or PIECE
 * messages sent with UDP_SEGMENT); received DATA records and datagram pieces
 * are reassembled, checked against a 2048-bit replay window, opened and
 * written to the TAP. Handshake messages that pass the core's gate (exact
 * size, mac1, quotas), and what Python must know (a session promoted, the
 * connection closed, a new peer address, EMSGSIZE), are queued as events and
 * signalled on an eventfd that asyncio watches. Python keeps the handshake,
 * the rekey decisions and the connection life cycle.
 *
 * All parsing of received bytes is in _fastpath_core.c (sans-IO: no Python, no
 * sockets; the fuzz harnesses in tests/fuzz/native drive the same functions);
 * this file owns the thread, the system calls and the Python type.
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

#include "_fastpath_core.h"

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#define UDP_SEGMENT_OPT 103
#define UDP_GRO_OPT 104

#define BUNDLE_FRAME_MAX 9216
#define READ_BATCH 64
#define TX_BUF (1 << 19)
#define OBUF_CAP (TX_BUF + MAX_RECORD + 8)
#define FLUSH_AT (1 << 18)
#define MAX_GSO_SEGMENTS 64
#define MAX_GSO_BYTES 65000
#define GSO_RETRY 30.0 /* seconds after the kernel refused a GSO send before trying again */
#define FLOW_RING 4096
#define FLOW_SNAP 128
#define GRO_BUF (65536 + 4096)

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
    unsigned char dir, vnet;
    uint32_t len, segs;
    uint16_t snap;
    unsigned char data[FLOW_SNAP];
} FlowRec;

typedef struct {
    PyObject_HEAD
    int tap, sock, stream, vnet, efd, cfd, ep;
    int running, initialised, gso, gso_wanted, out_blocked, tap_failed, msgsize_pending;
    double gso_retry, gso_retry_at; /* GSO refused: sent piece by piece until gso_retry_at */
    unsigned lost_control; /* control events whose malloc failed: bit per kind, re-made by take() */
    long long lost_value[8];
    pthread_t thread;
    pthread_mutex_t life; /* start/stop/dealloc: one joins the thread, the others wait for it */
    pthread_mutex_t lock; /* everything below; never held while blocking */
    FpCore c;             /* parsing and session state (_fastpath_core.c) */
    size_t bundle_limit, chunk;
    Event *ev_head, *ev_tail;
    int flows;
    FlowRec *flow_ring;
    size_t flow_head, flow_len, flow_lost;
    /* send counters (the receive ones are in c) */
    unsigned long long records_out, bytes_out, frames_out, keepalives_out;
    double last_tx;
    /* buffers */
    unsigned char *rbuf, *obuf, *gro, *piecebuf;
    size_t ostart, opos; /* stream output pending in obuf[ostart:opos] */
} Pump;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put32(unsigned char *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* -- events (lock held) ----------------------------------------------------------------- */

/* FpIO.event: queue one event for Python (the core already decided a handshake may go up). */
static int push_event(void *ctx, int kind, long long value, const void *data, size_t len,
                      const struct sockaddr_storage *addr, socklen_t alen) {
    Pump *p = ctx;
    if (kind == EV_MSGSIZE) { /* one pending is enough: Python re-reads the path MTU */
        if (p->msgsize_pending) return 0;
        p->msgsize_pending = 1;
    }
    Event *e = malloc(sizeof(Event) + len);
    uint64_t one = 1;
    if (!e) {
        if (kind == EV_MESSAGE) return -1;
        /* never lose CLOSED/ROTATED/...: take() re-makes it (PEER: Python re-learns on the next) */
        p->lost_control |= 1u << kind;
        p->lost_value[kind] = value;
        ssize_t w = write(p->efd, &one, 8);
        (void)w;
        return 0;
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
    ssize_t w = write(p->efd, &one, 8);
    (void)w;
    return 0;
}

static void event(Pump *p, int kind, long long value) { push_event(p, kind, value, NULL, 0, NULL, 0); }

/* -- frame accounting ------------------------------------------------------------------- */

/* FpIO.flow (received frames) and the sending side. */
static void flow_note(void *ctx, int dir, int vnet, const unsigned char *f, size_t n, unsigned segs) {
    Pump *p = ctx;
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

/* FpIO.tap: one received frame to the TAP; 0 or the errno. */
static int tap_out(void *ctx, const struct iovec *iov, int count) {
    Pump *p = ctx;
    ssize_t w = count == 1 ? write(p->tap, iov[0].iov_base, iov[0].iov_len) : writev(p->tap, iov, count);
    return w < 0 ? errno : 0;
}

static const FpIO PUMP_IO = {.tap = tap_out, .event = push_event, .flow = flow_note};

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
    if (p->c.closed) return;
    p->c.closed = 1;
    event(p, EV_CLOSED, err);
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
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = n};
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_name = &p->c.peer, .msg_namelen = p->c.peerlen, .msg_iov = &iov, .msg_iovlen = 1};
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
            event(p, EV_MSGSIZE, errno);
            return -2;
        }
        if (seg && seg < n && (errno == EINVAL || errno == EIO)) return -3;
        return -1; /* EAGAIN/ENOBUFS (8 MiB buffer full), unreachable: UDP may lose it */
    }
}

/* Whether to send runs of pieces with UDP_SEGMENT: asked for, and not refused in the last GSO_RETRY s
 * (a forged "packet too big" must not turn it off for good). */
static int gso_now(Pump *p) {
    if (p->gso || !p->gso_wanted) return p->gso;
    if (mono() >= p->gso_retry_at) p->gso = 1;
    return p->gso;
}

/* Send pieces [0, count) laid out every seg bytes in o (the last one ends at pos). */
static int dgram_pieces(Pump *p, const unsigned char *o, size_t pos, size_t count, size_t seg) {
    size_t b = 0;
    if (gso_now(p)) { /* the kernel takes at most MAX_GSO_SEGMENTS pieces and MAX_GSO_BYTES per send */
        size_t per = MAX_GSO_BYTES / seg;
        if (per > MAX_GSO_SEGMENTS) per = MAX_GSO_SEGMENTS;
        if (per < 1) per = 1;
        for (; b < count; b += per) {
            size_t e = b + per < count ? b + per : count;
            size_t from = b * seg, to = e == count ? pos : e * seg;
            int r = dgram_send(p, o + from, to - from, e - b > 1 ? seg : 0);
            if (r == -3) { /* GSO refused on this path (PMTU below seg, xfrm): piece by piece for a while */
                p->gso = 0;
                p->gso_retry_at = mono() + p->gso_retry;
                event(p, EV_MSGSIZE, EINVAL);
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
    if (!p->c.peerlen) {
        p->c.drops[D_QUEUE_FULL] += count_frames;
        return;
    }
    if (!chunk || n <= chunk + PH) {
        r = dgram_send(p, rec, n, 0);
    } else {
        size_t count = 0, pos = fp_split_pieces(rec, n, chunk, p->piecebuf, &count);
        if (!pos) {
            p->c.drops[D_TOO_BIG] += count_frames;
            return;
        }
        r = dgram_pieces(p, p->piecebuf, pos, count, PH + chunk);
    }
    if (r < 0) p->c.drops[r == -2 ? D_TOO_BIG : D_QUEUE_FULL] += count_frames;
}

/* Seal payload and send it (stream: queued in obuf, flushed at FLUSH_AT; datagram: right away).
 * Returns 1 when the record was sealed. */
static int send_payload(Pump *p, const unsigned char *payload, size_t n, int flags, unsigned count, size_t nbytes,
                        unsigned segs) {
    if (p->stream) {
        if (p->c.closed || !out_room(p, 4 + n + OVERHEAD)) {
            p->c.drops[D_QUEUE_FULL] += count;
            return 0;
        }
        size_t r = fp_seal(&p->c, payload, n, flags, p->obuf + p->opos + 4, count);
        if (!r) return 0;
        put32(p->obuf + p->opos, (uint32_t)r);
        p->opos += 4 + r;
        if (p->opos - p->ostart >= FLUSH_AT && !p->out_blocked) stream_flush(p);
    } else {
        unsigned char *rec = p->obuf;
        size_t r = fp_seal(&p->c, payload, n, flags, rec, count);
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
    p->c.drops[D_DEVICE]++;
    p->tap_failed = 1;
    epoll_ctl(p->ep, EPOLL_CTL_DEL, p->tap, NULL);
    event(p, EV_DEVICE, err);
}

/* Drain the TAP: small frames are bundled (u16 length prefix), big ones go alone. Never waits
 * for more frames than are queued, so bundling adds no latency. */
static void on_tap(Pump *p) {
    unsigned char *buf = p->rbuf;
    size_t pos = 0, nbytes = 0, limit = p->bundle_limit;
    unsigned count = 0, segs = 0;
    for (int i = 0; i < READ_BATCH && !p->out_blocked && !p->c.closed; i++) {
        ssize_t n = read(p->tap, buf + pos + 2, MAX_PAYLOAD);
        if (n <= 0) { /* a TAP never reads empty: 0 is a closed test device */
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) tap_failed(p, n ? errno : EPIPE);
            break;
        }
        if (n >= MAX_PAYLOAD) {
            p->c.drops[D_TOO_BIG]++;
            continue;
        }
        unsigned char *f = buf + pos + 2;
        unsigned s = (p->vnet && n > 1 && f[1]) ? fp_gso_segments(f, (size_t)n, 1) : 1;
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

/* -- receiving (the parsing is _fastpath_core.c's) ------------------------------------- */

static void on_stream(Pump *p) {
    for (int i = 0; i < 16; i++) {
        size_t room;
        unsigned char *at = fp_stream_space(&p->c, &room);
        ssize_t k = recv(p->sock, at, room, 0);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            mark_closed(p, k == 0 ? 0 : errno);
            return;
        }
        if (k < 0) return;
        fp_stream_received(&p->c, (size_t)k, mono());
        if (p->c.closed) return;
    }
}

static void on_udp(Pump *p) {
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage a;
        struct iovec iov = {.iov_base = p->gro, .iov_len = GRO_BUF};
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } u;
        struct msghdr m = {.msg_name = &a, .msg_namelen = sizeof a, .msg_iov = &iov, .msg_iovlen = 1,
                           .msg_control = u.buf, .msg_controllen = sizeof u.buf};
        ssize_t k = recvmsg(p->sock, &m, 0);
        if (k < 0) return;
        if (m.msg_flags & MSG_TRUNC) { /* more than GRO_BUF: never a record of ours */
            p->c.drops[D_TOO_BIG]++;
            continue;
        }
        size_t seg = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO_OPT) {
                int g;
                memcpy(&g, CMSG_DATA(c), sizeof g);
                if (g > 0) seg = (size_t)g;
            }
        fp_on_gro(&p->c, p->gro, (size_t)k, seg, &a, m.msg_namelen, mono());
    }
}

static void *run(void *arg) {
    Pump *p = arg;
    struct epoll_event evs[4];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the interpreter's business */
    if (p->stream && p->c.rend > p->c.rstart) {
        pthread_mutex_lock(&p->lock);
        fp_stream_parse(&p->c, mono());
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
            } else if (p->c.closed) {
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
        int done = p->c.closed && p->stream;
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

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    (void)args;
    (void)kw;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (!p) return NULL;
    p->efd = p->cfd = p->ep = p->tap = p->sock = -1; /* nothing of ours to close yet */
    p->c.tx = -1;
    pthread_mutex_init(&p->life, NULL);
    return (PyObject *)p;
}

static int check_ready(Pump *p) {
    if (p->initialised) return 0;
    PyErr_SetString(PyExc_RuntimeError, "Pump.__init__ was not run");
    return -1;
}

static int Pump_init(Pump *p, PyObject *args, PyObject *kw) {
    static char *names[] = {"tap_fd", "sock_fd", "stream", "vnet", "bundle_limit", "chunk", "flows", "gso",
                            "gso_retry", NULL};
    Py_ssize_t bundle = 32 * 1024, chunk = 0;
    int flows = 0, gso = 1, tap, sock, stream, vnet;
    double gso_retry = GSO_RETRY;
    if (p->initialised || p->rbuf || p->c.plain || p->efd >= 0) { /* also after a failed attempt: its buffers are ours */
        PyErr_SetString(PyExc_RuntimeError, "a Pump is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iipp|nnppd", names, &tap, &sock, &stream, &vnet, &bundle, &chunk, &flows,
                                     &gso, &gso_retry))
        return -1;
    if (!(gso_retry >= 0)) {
        PyErr_SetString(PyExc_ValueError, "gso_retry must be >= 0");
        return -1;
    }
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
    p->gso = p->gso_wanted = gso;
    p->gso_retry = gso_retry;
    fp_core_init(&p->c, stream, vnet, &PUMP_IO, p);
    p->rbuf = malloc(MAX_PAYLOAD + MAX_PAYLOAD + 2);
    p->obuf = malloc(OBUF_CAP > MAX_RECORD ? OBUF_CAP : MAX_RECORD);
    p->gro = p->stream ? NULL : malloc(GRO_BUF);
    p->piecebuf = p->stream ? NULL : malloc(MAX_RECORD + MAX_PIECES * PH);
    p->flow_ring = flows ? calloc(FLOW_RING, sizeof(FlowRec)) : NULL;
    if (fp_core_alloc(&p->c) < 0 || !p->rbuf || !p->obuf || (!p->stream && (!p->gro || !p->piecebuf)) ||
        (flows && !p->flow_ring)) {
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

/* Join the thread once: p->life is held (GIL released) by whoever joins, so a second stop() waits
 * for the first instead of joining the same thread again. */
static void stop_thread(Pump *p) {
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&p->life);
    if (p->running) {
        uint64_t one = 1;
        ssize_t w = write(p->cfd, &one, 8);
        (void)w;
        pthread_join(p->thread, NULL);
        p->running = 0;
    }
    pthread_mutex_unlock(&p->life);
    Py_END_ALLOW_THREADS
}

static void Pump_dealloc(Pump *p) {
    stop_thread(p);
    fp_core_free(&p->c);
    for (Event *e = p->ev_head, *n; e; e = n) {
        n = e->next;
        free(e);
    }
    free(p->rbuf);
    free(p->obuf);
    free(p->gro);
    free(p->piecebuf);
    free(p->flow_ring);
    if (p->efd >= 0) close(p->efd);
    if (p->cfd >= 0) close(p->cfd);
    if (p->ep >= 0) close(p->ep);
    if (p->initialised) pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->life);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Pump_start(Pump *p, PyObject *unused) {
    (void)unused;
    if (check_ready(p) < 0) return NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&p->life);
    if (!p->running) {
        uint64_t junk;
        ssize_t r = read(p->cfd, &junk, 8); /* a stop request of an earlier run */
        (void)r;
        err = pthread_create(&p->thread, NULL, run, p);
        p->running = !err;
    }
    pthread_mutex_unlock(&p->life);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Pump_stop(Pump *p, PyObject *unused) {
    (void)unused;
    if (check_ready(p) < 0) return NULL;
    stop_thread(p);
    NOGIL_LOCK(p, ts);
    if (p->stream && !p->c.closed) stream_flush(p); /* best effort, never waits */
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
}

/* Replace the session table with fresh (lock held). A session the pump already has keeps its live
 * state: the larger send counter (a nonce is never reused), the merged replay window, its counters,
 * and a promotion Python has not heard of yet. */
static void install_sessions(Pump *p, Slot *fresh, int tx) {
    int promoted = -1;
    for (int i = 0; i < SLOTS; i++) {
        Slot *s = &fresh[i];
        if (!s->used) continue;
        Slot *old = fp_slot_by_index(&p->c, s->local_index);
        if (!old || old->remote_index != s->remote_index) continue;
        fp_window_merge(s, old);
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
    for (int i = 0; i < SLOTS; i++) fp_free_slot(&p->c.slots[i]);
    memcpy(p->c.slots, fresh, sizeof(Slot) * SLOTS);
    p->c.tx = tx;
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
        if (skn != 32 || rkn != 32 || fp_slot_keys(s, (const unsigned char *)sk, (const unsigned char *)rk) < 0) {
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
    for (int i = 0; i < SLOTS; i++) fp_free_slot(&fresh[i]);
    return NULL;
}

static PyObject *Pump_session_counters(Pump *p, PyObject *unused) {
    (void)unused;
    if (check_ready(p) < 0) return NULL;
    Slot copy[SLOTS];
    NOGIL_LOCK(p, ts);
    memcpy(copy, p->c.slots, sizeof copy);
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
    (void)unused;
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
    fp_handshakes_taken(&p->c);
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
    (void)unused;
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
    (void)unused;
    if (check_ready(p) < 0) return NULL;
    unsigned long long c[8], drops[D_COUNT];
    double last_rx, last_tx;
    int closed, gso, out_blocked;
    unsigned long long flow_lost;
    NOGIL_LOCK(p, ts);
    unsigned long long src[8] = {p->records_out, p->bytes_out, p->frames_out, p->c.records_in,
                                 p->c.bytes_in, p->c.frames_in, p->c.keepalives_in, p->keepalives_out};
    memcpy(c, src, sizeof c);
    memcpy(drops, p->c.drops, sizeof drops);
    last_rx = p->c.last_rx;
    last_tx = p->last_tx;
    closed = p->c.closed;
    gso = p->gso;
    out_blocked = p->out_blocked;
    flow_lost = p->flow_lost;
    NOGIL_UNLOCK(p, ts);
    PyObject *dd = PyDict_New();
    for (int i = 0; dd && i < D_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(drops[i]);
        if (!v || PyDict_SetItemString(dd, FP_DROP_NAMES[i], v) < 0) Py_CLEAR(dd);
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
        if (!p->c.closed && b.len <= MAX_RECORD && out_room(p, 4 + (size_t)b.len)) {
            put32(p->obuf + p->opos, (uint32_t)b.len);
            memcpy(p->obuf + p->opos + 4, b.buf, (size_t)b.len);
            p->opos += 4 + (size_t)b.len;
            if (!p->out_blocked) stream_flush(p);
            ok = !p->c.closed;
        }
    } else {
        ok = p->c.peerlen && dgram_send(p, b.buf, (size_t)b.len, 0) == 0;
    }
    pthread_mutex_unlock(&p->lock);
    Py_END_ALLOW_THREADS PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

/* send_keepalive() -> bool: an empty record under the current session. */
static PyObject *Pump_send_keepalive(Pump *p, PyObject *unused) {
    (void)unused;
    if (check_ready(p) < 0) return NULL;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS pthread_mutex_lock(&p->lock);
    ok = send_payload(p, (const unsigned char *)"", 0, p->vnet ? FLAG_VNET : 0, 0, 0, 0);
    if (ok) {
        p->records_out--; /* a keepalive is not a record of frames */
        p->keepalives_out++;
    }
    if (p->stream && !p->out_blocked && !p->c.closed) stream_flush(p);
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
    memcpy(&p->c.peer, &a, sizeof a);
    p->c.peerlen = len;
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
    if (p->running || !p->stream || (size_t)b.len > RX_RING - p->c.rend) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "feed is for a stream pump before start()");
        return NULL;
    }
    memcpy(p->c.ring + p->c.rend, b.buf, (size_t)b.len);
    p->c.rend += (size_t)b.len;
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* set_static(public_key): this node's static X25519 public key; from then on only handshake messages
 * whose mac1 is keyed by it reach Python. */
static PyObject *Pump_set_static(Pump *p, PyObject *arg) {
    if (check_ready(p) < 0) return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    if (b.len != 32) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "a static public key is 32 bytes");
        return NULL;
    }
    unsigned char pub[32];
    memcpy(pub, b.buf, 32);
    PyBuffer_Release(&b);
    NOGIL_LOCK(p, ts);
    fp_set_static(&p->c, pub);
    NOGIL_UNLOCK(p, ts);
    Py_RETURN_NONE;
}

static PyObject *Pump_event_fd(Pump *p, void *unused) {
    (void)unused;
    return PyLong_FromLong(p->efd);
}

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
    {"set_static", (PyCFunction)Pump_set_static, METH_O, "This node's static public key (handshake mac1)."},
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastpath", .m_doc = "Native tunnel fast path.", .m_size = -1};

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
