/* The C ABI from a C program on the host: load a model file, score the rows
 * of a golden file and compare with the expected log p and verdict, batch-score
 * them, draw a sample, and check that a corrupted copy is refused with the
 * right status. Exit status 0 only if everything agrees.
 *
 * Usage: host MODEL.ffjd ROWS.txt
 * ROWS.txt: one row per line, "x_1 … x_D log_p verdict" (verdict 0/1). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ffjord.h"

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL.ffjd ROWS.txt\n", argv[0]);
        return 2;
    }
    size_t len = 0;
    unsigned char *bytes = read_file(argv[1], &len);
    if (!bytes) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    FfjordModel model; /* caller-owned storage: no allocation in the library */
    int32_t st = ffjord_model_load(bytes, len, &model);
    if (st != FFJORD_STATUS_OK) {
        fprintf(stderr, "%s: %s\n", argv[1], ffjord_status_name(st));
        return 1;
    }
    size_t dim = ffjord_model_dim(&model);
    size_t scratch_len = ffjord_model_scratch_len(&model);
    float *scratch = calloc(scratch_len, sizeof(float));
    float threshold = 0.0f, quantile = 0.0f;
    st = ffjord_model_threshold(&model, &threshold, &quantile);
    printf("%s: dim %zu, scratch %zu floats, threshold %g at q = %g (%s)\n", argv[1], dim, scratch_len,
           threshold, quantile, ffjord_status_name(st));

    FILE *rows_file = fopen(argv[2], "r");
    if (!rows_file) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 2;
    }
    enum { MAX_ROWS = 64 };
    float *xs = calloc(MAX_ROWS * dim, sizeof(float)), expected[MAX_ROWS];
    int verdicts[MAX_ROWS];
    size_t rows = 0, failures = 0;
    while (rows < MAX_ROWS) {
        float *x = &xs[rows * dim];
        size_t j = 0;
        for (; j < dim; j++)
            if (fscanf(rows_file, "%f", &x[j]) != 1) break;
        if (j < dim || fscanf(rows_file, "%f %d", &expected[rows], &verdicts[rows]) != 2) break;
        FfjordScore s;
        st = ffjord_score(&model, x, dim, scratch, scratch_len, &s);
        double tol = 1e-5 * (1.0 + fabs(expected[rows]));
        if (st != FFJORD_STATUS_OK || fabs(s.log_p - expected[rows]) > tol || s.verdict != verdicts[rows]) {
            printf("MISMATCH row %zu: status %s, log p %.9g (expected %.9g), verdict %d (expected %d)\n", rows,
                   ffjord_status_name(st), s.log_p, expected[rows], s.verdict, verdicts[rows]);
            failures++;
        }
        rows++;
    }
    fclose(rows_file);

    float batch[MAX_ROWS];
    size_t failed_row = 0;
    st = ffjord_log_density_batch(&model, xs, rows, dim, batch, scratch, scratch_len, &failed_row);
    for (size_t i = 0; st == FFJORD_STATUS_OK && i < rows; i++)
        if (fabs(batch[i] - expected[i]) > 1e-5 * (1.0 + fabs(expected[i]))) {
            printf("MISMATCH batch row %zu: %.9g vs %.9g\n", i, batch[i], expected[i]);
            failures++;
        }
    if (st != FFJORD_STATUS_OK) {
        printf("MISMATCH batch: %s at row %zu\n", ffjord_status_name(st), failed_row);
        failures++;
    }

    float *sample = calloc(dim, sizeof(float));
    st = ffjord_sample(&model, 42, sample, dim, scratch, scratch_len);
    if (st != FFJORD_STATUS_OK || !isfinite(sample[0])) {
        printf("MISMATCH sample: %s\n", ffjord_status_name(st));
        failures++;
    }

    /* A flipped byte is refused as a checksum mismatch; a NaN input by name. */
    bytes[len / 2] ^= 0x40;
    FfjordModel broken;
    st = ffjord_model_load(bytes, len, &broken);
    if (st != FFJORD_STATUS_CHECKSUM_MISMATCH) {
        printf("MISMATCH corrupted file: %s\n", ffjord_status_name(st));
        failures++;
    }
    bytes[len / 2] ^= 0x40;
    xs[0] = NAN;
    FfjordScore s;
    st = ffjord_score(&model, xs, dim, scratch, scratch_len, &s);
    if (st != FFJORD_STATUS_NON_FINITE_INPUT) {
        printf("MISMATCH NaN input: %s\n", ffjord_status_name(st));
        failures++;
    }

    printf("%zu rows scored, %zu mismatches\n", rows, failures);
    free(sample);
    free(xs);
    free(scratch);
    free(bytes);
    return failures == 0 && rows > 0 ? 0 : 1;
}
