/* The experts' GEMMs with the experts shared out over the threads: moe/expert_gemm.py loads it
   (docstring there; docs/fast-moe.md says why). Built once per PyTorch install, linked to its MKL and libgomp. */
#include <stdint.h>
#include <string.h>
void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc);

static const float one = 1.0f, zero = 0.0f;  /* sgemm_ takes every argument by address */
static const char N = 'N', T = 'T';

/* Expert e has counts[e] rows from row start[e] = counts[0] + ... + counts[e-1]. The threads take the experts one at
   a time, largest first (order), so that they finish together. */
static void plan(int E, const int64_t *counts, int *order, int64_t *start) {
    int64_t s = 0;
    for (int e = 0; e < E; e++) { start[e] = s; s += counts[e]; order[e] = e; }
    for (int i = 1; i < E; i++) {  /* insertion sort, stable: E is small */
        int e = order[i], j = i;
        for (; j > 0 && counts[order[j - 1]] < counts[e]; j--) order[j] = order[j - 1];
        order[j] = e;
    }
}

/* y[rows of e] [n_e, n] = x[rows of e] [n_e, k] W_e [k, n], plus bias[e] [n] on every row when bias is not NULL
   (the rows start as the bias and the product is added: beta = 1). x is row-major (ldx), y contiguous; W_e = w +
   e * w_stride, row-major with ldw, or the transpose of such when tw. Row-major Y = X W is column-major
   Y^T = W^T X^T: hence W before X in the call. */
void expert_rows(int E, const int64_t *counts, const float *x, int ldx, const float *w, int64_t w_stride, int ldw,
                 int tw, int k, int n, const float *bias, float *y, int threads) {
    int order[E];
    int64_t start[E];
    plan(E, counts, order, start);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < E; i++) {
        const int e = order[i], m = (int)counts[e];
        if (m == 0) continue;
        float *ye = y + start[e] * n;
        if (bias)
            for (int r = 0; r < m; r++) memcpy(ye + (int64_t)r * n, bias + (int64_t)e * n, sizeof(float) * n);
        sgemm_(tw ? &T : &N, &N, &n, &m, &k, &one, w + e * w_stride, &ldw, x + start[e] * ldx, &ldx,
               bias ? &one : &zero, ye, &n);
    }
}

/* out[e] [d, h] = x[rows of e]^T g[rows of e] (zero for an expert without rows), x [N, d] and g [N, h] row-major
   (ldx, ldg), out contiguous. With colsum not NULL, colsum[e] [h] = the sum of g's rows of e too: the gradient of a
   bias added to those rows, summed by the same thread while the rows are in cache. */
void expert_grads(int E, const int64_t *counts, const float *x, int ldx, const float *g, int ldg, int d, int h,
                  float *out, float *colsum, int threads) {
    int order[E];
    int64_t start[E];
    plan(E, counts, order, start);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int i = 0; i < E; i++) {
        const int e = order[i], k = (int)counts[e];
        const float *ge = g + start[e] * ldg;
        float *oe = out + (int64_t)e * d * h;
        if (colsum) {
            float *restrict s = colsum + (int64_t)e * h;
            const float *restrict gr = ge;
            memset(s, 0, sizeof(float) * h);
            for (int r = 0; r < k; r++)
                for (int j = 0; j < h; j++) s[j] += gr[(int64_t)r * ldg + j];
        }
        if (k == 0) {
            memset(oe, 0, sizeof(float) * d * h);
            continue;
        }
        sgemm_(&N, &T, &h, &d, &k, &one, ge, &ldg, x + start[e] * ldx, &ldx, &zero, oe, &h);  /* out^T = g^T x */
    }
}
