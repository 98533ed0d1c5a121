/* The C ABI on a Cortex-M4F: the model file is a const array in flash, the
 * model handle and the scratch are static, and every golden row (computed on
 * the host by the same runtime) is scored and compared: log p within 1e-5
 * relative, the same function evaluations and verdict. Exit status = the
 * number of mismatches (0: all agree). */
#include <stddef.h>
#include <stdint.h>

#include "ffjord.h"
#include "generated/golden.h" /* model_bytes[], GOLDEN_ROWS, golden_x, golden_log_p, golden_nfe, golden_verdict */
#include "semihost.h"

static FfjordModel model;
static float scratch[1024];

static void put_int(long v) {
    char buf[24], *p = buf + sizeof buf;
    int neg = v < 0;
    unsigned long u = neg ? 0ul - (unsigned long)v : (unsigned long)v;
    *--p = 0;
    do *--p = (char)('0' + u % 10); while (u /= 10);
    if (neg) *--p = '-';
    semihost_write(p);
}

/* Prints x with 6 decimals (enough to read; the comparison is on the floats). */
static void put_float(float x) {
    if (x < 0) {
        semihost_write("-");
        x = -x;
    }
    long whole = (long)x;
    put_int(whole);
    semihost_write(".");
    long frac = (long)((x - (float)whole) * 1e6f + 0.5f);
    for (long d = 100000; d > frac && d > 1; d /= 10) semihost_write("0");
    put_int(frac);
}

static int close_enough(float a, float b) {
    float d = a > b ? a - b : b - a, m = b < 0 ? -b : b;
    return d <= 1e-5f * (1.0f + m);
}

int main(void) {
    int32_t st = ffjord_model_load(model_bytes, sizeof model_bytes, &model);
    if (st != FFJORD_STATUS_OK) {
        semihost_write("model rejected: ");
        semihost_write(ffjord_status_name(st));
        semihost_write("\n");
        return 100;
    }
    size_t dim = ffjord_model_dim(&model), need = ffjord_model_scratch_len(&model);
    semihost_write("C ABI on Cortex-M4F: dim ");
    put_int((long)dim);
    semihost_write(", scratch ");
    put_int((long)need);
    semihost_write(" floats\n");
    if (need > sizeof scratch / sizeof scratch[0]) return 101;
    int failures = 0;
    for (size_t r = 0; r < GOLDEN_ROWS; r++) {
        FfjordScore s;
        st = ffjord_score(&model, &golden_x[r * dim], dim, scratch, need, &s);
        int ok = st == FFJORD_STATUS_OK && close_enough(s.log_p, golden_log_p[r]) && s.nfe == golden_nfe[r] &&
                 s.verdict == golden_verdict[r];
        failures += !ok;
        semihost_write("row ");
        put_int((long)r);
        semihost_write(": log p = ");
        put_float(s.log_p);
        semihost_write(", nfe = ");
        put_int((long)s.nfe);
        semihost_write(ok ? ", ok\n" : ", MISMATCH\n");
        if (st != FFJORD_STATUS_OK) {
            semihost_write("  status: ");
            semihost_write(ffjord_status_name(st));
            semihost_write("\n");
        }
    }
    /* Bad input on the device gets the same typed status as on the host. */
    float bad[16] = {0};
    FfjordScore s;
    if (ffjord_score(&model, bad, dim + 1, scratch, need, &s) != FFJORD_STATUS_INPUT_DIMENSION) failures++;
    semihost_write(failures ? "MISMATCHES: " : "all rows agree with the host; mismatches: ");
    put_int(failures);
    semihost_write("\n");
    return failures;
}
