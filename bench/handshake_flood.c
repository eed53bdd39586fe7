/*
 * How many flood datagrams one core of the fast path refuses per second (bench/bench_handshake_flood.py
 * builds and runs this). It drives the sans-IO core (vna_agent/dataplane/_fastpath_core.c) exactly as
 * the pump does after recvmsg, without the system calls, so the figure is the parsing cost alone:
 *
 *   short      1-byte "01" datagrams (the review's flood): refused on size
 *   size       132-byte initiations with a wrong mac1 from a non-peer address: one BLAKE2s each
 *              up to HS_CHECK_RATE per second, refused unchecked past it
 *   size_peer  the same from the peer's address (spoofed): always checked, one BLAKE2s each
 *   mac1       initiations with a valid mac1 (the sender knows the public key) from a non-peer
 *              address: refused by the per-origin quota and token buckets but for a few a second
 *   pieces     PIECE messages naming an unknown session
 *   records    genuine 1400-byte DATA records (for scale: what the same core opens per second)
 *
 * Python would take() the queued handshakes every millisecond here (a pessimistic drain rate: each
 * take() refills the per-take quota). Output: one JSON object.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_fastpath_core.h"

static unsigned long long passed, frames;
static const unsigned char PUB[32] = {0x53, 0x50, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                      15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
static const unsigned char KEY[32] = {0x4b, 0x59, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                      15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};

static int tap(void *ctx, const struct iovec *iov, int count) {
    (void)ctx;
    (void)iov;
    (void)count;
    frames++;
    return 0;
}

static int event(void *ctx, int kind, long long value, const void *data, size_t len, const struct sockaddr_storage *a,
                 socklen_t alen) {
    (void)ctx;
    (void)value;
    (void)data;
    (void)len;
    (void)a;
    (void)alen;
    if (kind == EV_MESSAGE) passed++;
    return 0;
}

static const FpIO IO = {.tap = tap, .event = event, .flow = NULL};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void keyed(FpCore *c, FpCore *tx) {
    fp_core_init(c, 0, 0, &IO, NULL);
    if (fp_core_alloc(c) < 0) exit(2);
    fp_core_init(tx, 0, 0, &IO, NULL);
    Slot *s = &c->slots[0], *t = &tx->slots[0];
    s->used = t->used = 1;
    s->local_index = t->remote_index = 7;
    s->limit = t->limit = UINT64_MAX;
    if (fp_slot_keys(s, KEY, KEY) < 0 || fp_slot_keys(t, KEY, KEY) < 0) exit(2);
    c->tx = tx->tx = 0;
    fp_set_static(c, PUB);
    c->peerlen = 16; /* a sockaddr_in */
    c->peer.ss_family = AF_INET;
}

/* Feed msgs (count of them, lengths lens) round robin for seconds, from the peer's address or another;
 * returns datagrams per second. */
static double run(FpCore *c, unsigned char **msgs, size_t *lens, size_t count, double seconds, int from_peer) {
    struct sockaddr_storage from = c->peer;
    if (!from_peer) ((unsigned char *)&from)[4] = 203;
    unsigned long long n = 0;
    double start = mono(), now = start, last_take = start;
    while (now - start < seconds) {
        for (int i = 0; i < 1024; i++, n++) fp_on_datagram(c, msgs[n % count], lens[n % count], &from, 16, now);
        now = mono();
        if (now - last_take >= 0.001) {
            fp_handshakes_taken(c);
            last_take = now;
        }
    }
    return n / (now - start);
}

static void mac1(unsigned char *msg, size_t n) {
    unsigned char in[40], key[32];
    memcpy(in, "mac1----", 8);
    memcpy(in + 8, PUB, 32);
    fp_blake2s(key, 32, NULL, 0, in, sizeof in);
    fp_blake2s(msg + n - MAC1_LEN, MAC1_LEN, key, 32, msg, n - MAC1_LEN);
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    FpCore c, tx;
    keyed(&c, &tx);
    static unsigned char shortm[1] = {1}, size[INITIATION_LEN], valid[INITIATION_LEN], piece[1216];
    static unsigned char recs[64][1400 + OVERHEAD], payload[1400];
    for (size_t i = 0; i < sizeof size; i++) size[i] = valid[i] = (unsigned char)(i * 7);
    size[0] = valid[0] = T_INITIATION;
    size[1] = size[2] = size[3] = valid[1] = valid[2] = valid[3] = 0;
    mac1(valid, sizeof valid);
    memset(piece, 0x5a, sizeof piece);
    piece[0] = T_PIECE;
    piece[1] = 0;
    piece[2] = 2;
    piece[3] = 0;
    unsigned char *m;
    size_t l;
    m = shortm, l = 1;
    double r_short = run(&c, &m, &l, 1, seconds, 0);
    m = size, l = sizeof size;
    double r_size = run(&c, &m, &l, 1, seconds, 0);
    double r_size_peer = run(&c, &m, &l, 1, seconds, 1);
    passed = 0;
    m = valid, l = sizeof valid;
    double t0 = mono();
    double r_mac1 = run(&c, &m, &l, 1, seconds, 0);
    double passed_per_s = passed / (mono() - t0);
    m = piece, l = sizeof piece;
    double r_pieces = run(&c, &m, &l, 1, seconds, 0);
    /* genuine records: sealed ahead, opened round robin with the window reset (a replay otherwise) */
    unsigned char *rp[64];
    size_t rl[64];
    for (int i = 0; i < 64; i++) {
        rl[i] = fp_seal(&tx, payload, sizeof payload, 0, recs[i], 1);
        rp[i] = recs[i];
    }
    unsigned long long n = 0;
    struct sockaddr_storage peer = c.peer;
    double start = mono(), now = start;
    while (now - start < seconds) {
        for (int i = 0; i < 64; i++, n++) {
            c.slots[0].has_top = 0;
            fp_on_datagram(&c, rp[i], rl[i], &peer, c.peerlen, now);
        }
        now = mono();
    }
    double r_records = n / (now - start);
    printf("{\"short_per_s\": %.0f, \"size_per_s\": %.0f, \"size_peer_per_s\": %.0f, \"mac1_per_s\": %.0f, "
           "\"mac1_passed_per_s\": %.1f, \"pieces_per_s\": %.0f, \"records_per_s\": %.0f, \"frames\": %llu, "
           "\"seconds\": %.2f}\n",
           r_short, r_size, r_size_peer, r_mac1, passed_per_s, r_pieces, r_records, frames, seconds);
    return 0;
}
