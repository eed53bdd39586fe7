/*
 * Unit checks of the sans-IO core that no socket can reach (or only with timing), built with
 * AddressSanitizer and run by tests/fuzz/test_native_fuzz.py: a record longer than any caller passes
 * today is refused before it is decrypted into the MAX_PAYLOAD buffer (review finding 5); valid-mac1
 * handshakes reach Python at a bounded rate however often it drains (finding 4); BLAKE2s (mac1)
 * matches the RFC 7693 / reference test vectors. Prints "ok" and exits 0, or names the failed check.
 */
#include <stdio.h>

#include "fuzz_common.h"

static int failures;

static void check(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "FAILED: %s\n", what);
        failures++;
    }
}

static void hex(unsigned char *out, const char *h, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
}

static void test_oversized_record_is_refused_before_decryption(void) {
    FpCore c;
    fz_core(&c, 0, 0, -1);
    size_t n = MAX_RECORD + 4096;
    unsigned char *rec = calloc(1, n);
    rec[0] = T_DATA;
    rec[4] = (LOCAL_INDEX >> 24) & 0xff;
    rec[5] = (LOCAL_INDEX >> 16) & 0xff;
    rec[6] = (LOCAL_INDEX >> 8) & 0xff;
    rec[7] = LOCAL_INDEX & 0xff;
    check(fp_open_record(&c, rec, n, 1.0, NULL) == 0, "an oversized record is not accepted");
    check(c.drops[D_TOO_BIG] == 1, "an oversized record counts as too_big");
    check(c.drops[D_BAD_TAG] == 0, "an oversized record never reaches AES-GCM");
    free(rec);
    fz_release(&c);
}

static void test_blake2s_vectors(void) {
    unsigned char out[32], want[32], key[32];
    fp_blake2s(out, 32, NULL, 0, "abc", 3);
    hex(want, "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982", 32);
    check(!memcmp(out, want, 32), "BLAKE2s-256(\"abc\") (RFC 7693 appendix B)");
    for (int i = 0; i < 32; i++) key[i] = (unsigned char)i;
    fp_blake2s(out, 32, key, 32, "", 0);
    hex(want, "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49", 32);
    check(!memcmp(out, want, 32), "keyed BLAKE2s-256 of the empty message (reference KAT)");
    unsigned char in[255];
    for (int i = 0; i < 255; i++) in[i] = (unsigned char)i;
    fp_blake2s(out, 32, key, 32, in, 255);
    hex(want, "3fb735061abc519dfe979e54c1ee5bfad0a9d858b3315bad34bde999efd724dd", 32);
    check(!memcmp(out, want, 32), "keyed BLAKE2s-256 of 00..fe (reference KAT)");
}

/* A handshake with a valid mac1 for STATIC_PUB (the rest is not checked in C). */
static void valid_initiation(unsigned char *m) {
    unsigned char in[40], key[32];
    memset(m, 0x42, INITIATION_LEN);
    m[0] = T_INITIATION;
    m[1] = m[2] = m[3] = 0;
    memcpy(in, "mac1----", 8);
    memcpy(in + 8, STATIC_PUB, 32);
    fp_blake2s(key, 32, NULL, 0, in, sizeof in);
    fp_blake2s(m + INITIATION_LEN - MAC1_LEN, MAC1_LEN, key, 32, m, INITIATION_LEN - MAC1_LEN);
}

/* However often Python drains, valid-mac1 handshakes reach it at most burst + rate x seconds, from the
 * peer's address (spoofed) as from elsewhere. */
static void test_handshakes_to_python_are_rate_limited(void) {
    unsigned char m[INITIATION_LEN];
    valid_initiation(m);
    for (int from_peer = 0; from_peer < 2; from_peer++) {
        FpCore c;
        fz_core(&c, 0, 0, -1);
        unsigned passed = 0;
        for (int i = 0; i < 1000; i++) {
            passed += (unsigned)fp_handshake_gate(&c, m, sizeof m, from_peer, 10.0);
            fp_handshakes_taken(&c); /* Python drained: the per-take quota is back */
        }
        unsigned burst = from_peer ? (unsigned)HS_BURST_PEER : (unsigned)HS_BURST_OTHER;
        check(passed == burst, from_peer ? "the peer's burst" : "the burst from elsewhere");
        for (int i = 1; i <= 1000; i++) { /* one more second, a message every millisecond */
            passed += (unsigned)fp_handshake_gate(&c, m, sizeof m, from_peer, 10.0 + i * 0.001);
            fp_handshakes_taken(&c);
        }
        unsigned rate = from_peer ? (unsigned)HS_RATE_PEER : (unsigned)HS_RATE_OTHER;
        check(passed + 1 >= burst + rate && passed <= burst + rate, from_peer ? "the peer's rate" : "the rate elsewhere");
        m[INITIATION_LEN - 1] ^= 1;
        check(!fp_handshake_gate(&c, m, sizeof m, from_peer, 20.0), "a wrong mac1 is refused");
        m[INITIATION_LEN - 1] ^= 1;
        fz_release(&c);
    }
}

int main(void) {
    test_oversized_record_is_refused_before_decryption();
    test_handshakes_to_python_are_rate_limited();
    test_blake2s_vectors();
    if (failures) return 1;
    puts("ok");
    return 0;
}
