/*
 * Sans-IO core of the native fast path (see _fastpath.c): everything that parses bytes a peer sent.
 *
 * No Python, no sockets, no clock: the pump (_fastpath.c) and the libFuzzer harnesses
 * (tests/fuzz/native) drive the same functions with the bytes they read and the time they
 * measured; what the core produces (frames for the TAP, events for Python, sampled frame heads)
 * leaves through the FpIO callbacks. Wire formats are those of wire.py.
 */
#ifndef SKYFERRY_FASTPATH_CORE_H
#define SKYFERRY_FASTPATH_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <openssl/evp.h>

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
#define RX_RING (1 << 20)
#define WINDOW_WORDS 32 /* 2048 bits */
#define SLOTS 4
#define PARTIALS 16
#define MAX_PIECES 255
#define PARTIAL_TTL 1.0
/* A partial is opened only for a counter at most this far above the window's top. */
#define PARTIAL_AHEAD 4096
/* Handshake messages (handshake.py): exact sizes, mac1 over all but the last 16 bytes. */
#define INITIATION_LEN 132
#define RESPONSE_LEN 76
#define MAC1_LEN 16
/* Handshakes queued for Python between two take() calls, per type and origin (the link's peer or
 * anyone else), and token buckets (per second, burst): per origin for the messages that reach
 * Python (a flood costs it a bounded number of X25519 attempts per second whatever its rate; a
 * genuine peer sends a few per rekey), and for the mac1 checks of messages from elsewhere (a flood
 * costs this thread a bounded number of BLAKE2s per second; past it, such messages are refused
 * unchecked, which is where WireGuard would answer with a cookie). Messages from the peer's address
 * are always checked. */
#define HS_QUOTA_PEER 8
#define HS_QUOTA_OTHER 8
#define HS_RATE_PEER 100.0
#define HS_BURST_PEER 32.0
#define HS_RATE_OTHER 50.0
#define HS_BURST_OTHER 16.0
#define HS_CHECK_RATE 65536.0
#define HS_CHECK_BURST 4096.0

enum { EV_MESSAGE = 1, EV_ROTATED = 2, EV_CLOSED = 3, EV_PEER = 4, EV_MSGSIZE = 5, EV_DEVICE = 6 };
enum {
    D_BAD_TAG, D_REPLAY, D_NO_SESSION, D_NONCE, D_TOO_BIG, D_DECODE, D_INCOMPLETE,
    D_QUEUE_FULL, D_OFFLOAD, D_DEVICE, D_HANDSHAKE, D_COUNT
};
extern const char *const FP_DROP_NAMES[D_COUNT];

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
    size_t piece_len, total; /* every piece but the last is piece_len bytes at idx * piece_len */
    struct sockaddr_storage from; /* pieces of one record come from one address */
    socklen_t fromlen;
    uint64_t have[4];
    uint64_t stamp;
    double created;
    unsigned char *buf;
} Partial;

typedef struct {
    double tokens, stamp;
} FpBucket;

/* What the core hands out. tap: write one frame (the iovec pieces in order); 0 or an errno.
 * event: queue an event for Python; 0, or -1 when it could not be queued. flow: a received frame
 * (for the flow sampler); may be NULL. */
typedef struct {
    int (*tap)(void *ctx, const struct iovec *iov, int count);
    int (*event)(void *ctx, int kind, long long value, const void *data, size_t len,
                 const struct sockaddr_storage *addr, socklen_t alen);
    void (*flow)(void *ctx, int dir, int vnet, const unsigned char *f, size_t n, unsigned segs);
} FpIO;

typedef struct {
    int stream, vnet, closed;
    const FpIO *io;
    void *ctx;
    Slot slots[SLOTS];
    int tx; /* slot index sealing, -1 none */
    Partial partials[PARTIALS];
    uint64_t pstamp;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    /* handshake gate */
    int has_mac1;
    uint32_t mac1_state[8]; /* BLAKE2s chaining value once the mac1 key block is absorbed */
    unsigned hs_queued[2][2]; /* [response?][from the peer?] since the last fp_handshakes_taken */
    FpBucket hs_pass[2]; /* handshakes passed to Python: [from the peer?] */
    FpBucket hs_check;   /* handshakes from elsewhere mac1-checked */
    /* receive counters (the pump keeps the send ones) */
    unsigned long long records_in, bytes_in, frames_in, keepalives_in, drops[D_COUNT];
    double last_rx;
    unsigned char *plain; /* MAX_PAYLOAD: an opened record */
    unsigned char *ring;  /* stream: RX_RING bytes received, ring[rstart:rend] not parsed yet */
    size_t rstart, rend;
} FpCore;

/* Life cycle: init sets everything to empty; alloc gets the buffers (0, or -1 out of memory). */
void fp_core_init(FpCore *c, int stream, int vnet, const FpIO *io, void *ctx);
int fp_core_alloc(FpCore *c);
void fp_core_free(FpCore *c);
void fp_free_slot(Slot *s);
Slot *fp_slot_by_index(FpCore *c, uint32_t idx);

/* Replay window. check: 0 acceptable, -1 replayed or too old. */
int fp_window_check(const Slot *s, uint64_t c);
void fp_window_accept(Slot *s, uint64_t c);
void fp_window_merge(Slot *dst, const Slot *src);

/* Session keys of a slot (32 bytes each); 0, or -1 when OpenSSL refuses. */
int fp_slot_keys(Slot *s, const unsigned char *send_key, const unsigned char *recv_key);

/* Seal payload into out (HDR + ciphertext + TAG) under the sending slot; the record length, 0 on drop
 * (frames: how many frames the drop counts). */
size_t fp_seal(FpCore *c, const unsigned char *payload, size_t n, int flags, unsigned char *out, unsigned frames);

/* Lay out the record rec[0:n] as count PIECE messages every PH + chunk bytes in out (the last one ends
 * at the returned length); 0 when it needs more than MAX_PIECES. */
size_t fp_split_pieces(const unsigned char *rec, size_t n, size_t chunk, unsigned char *out, size_t *count);

/* Receiving. A DATA record: 1 when it authenticated; *advanced (may be NULL) says whether it moved
 * the window's top (only such a record may move the peer's address). */
int fp_open_record(FpCore *c, const unsigned char *rec, size_t n, double now, int *advanced);
/* One datagram from addr (never NULL). */
void fp_on_datagram(FpCore *c, const unsigned char *d, size_t n, const struct sockaddr_storage *a, socklen_t alen,
                    double now);
/* What one recvmsg returned: k bytes, GRO segments of seg bytes (0: one datagram). */
void fp_on_gro(FpCore *c, const unsigned char *buf, size_t k, size_t seg, const struct sockaddr_storage *a,
               socklen_t alen, double now);
/* Stream: where the next read goes (compacts the ring; *room: bytes free), then how many arrived. */
unsigned char *fp_stream_space(FpCore *c, size_t *room);
void fp_stream_received(FpCore *c, size_t k, double now);
void fp_stream_parse(FpCore *c, double now);

/* Handshakes. set_static: this node's static public key (mac1 is keyed by it on both message types). */
void fp_set_static(FpCore *c, const unsigned char pub[32]);
/* 1 when msg is a well-formed handshake for this node that fits the quotas (and counts it), else 0. */
int fp_handshake_gate(FpCore *c, const unsigned char *d, size_t n, int from_peer, double now);
void fp_handshakes_taken(FpCore *c);

/* Frames. vnet_check: 0 when the virtio_net_hdr of f[0:n] is one the local kernel may get, else -1.
 * gso_segments: the wire frames a (checked) GSO frame stands for. */
int fp_vnet_check(const unsigned char *f, size_t n);
unsigned fp_gso_segments(const unsigned char *f, size_t n, int vnet);
/* An opened payload (frames are fixed up in place: p is writable). */
void fp_deliver(FpCore *c, unsigned char *p, size_t n, int flags);

/* Keyed BLAKE2s (RFC 7693): out_len 1..32 bytes, key 0..32 bytes. */
void fp_blake2s(unsigned char *out, size_t out_len, const void *key, size_t key_len, const void *in, size_t in_len);

#endif
