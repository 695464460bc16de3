/* sample.c -- next-token choice on host logits: repetition penalty, temperature,
 * top-k, top-p (nucleus), then an inverse-CDF draw with a caller-given uniform. */
#include <math.h>
#include <stdlib.h>

#include "ft.h"

typedef struct scored {
    float logit;
    int32_t id;
} scored;

static int by_logit_desc(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id); /* ties: lower id first */
}

static int argmax(const float *z, int V)
{
    int best = 0;
    for (int i = 1; i < V; i++)
        if (z[i] > z[best]) best = i;
    return best;
}

int ft_sample_token(float *logits, int V, const int32_t *prev, int n_prev, float repetition_penalty,
                    float temperature, int top_k, float top_p, double u, int32_t *scratch_idx)
{
    /* penalty once per distinct previous id (as HF: divide positive, multiply negative) */
    if (repetition_penalty != 1.0f) {
        for (int i = 0; i < n_prev; i++) {
            int32_t id = prev[i];
            if (id < 0 || id >= V) continue;
            scratch_idx[id] = 0;
        }
        for (int i = 0; i < n_prev; i++) {
            int32_t id = prev[i];
            if (id < 0 || id >= V || scratch_idx[id] == 1) continue;
            scratch_idx[id] = 1;
            logits[id] = logits[id] < 0.0f ? logits[id] * repetition_penalty : logits[id] / repetition_penalty;
        }
    }
    if (temperature <= 0.0f) return argmax(logits, V);
    scored *s = malloc((size_t)V * sizeof *s);
    if (!s) return argmax(logits, V); /* degrade to greedy rather than fail mid-generation */
    for (int i = 0; i < V; i++) {
        s[i].logit = logits[i] / temperature;
        s[i].id = i;
    }
    qsort(s, (size_t)V, sizeof *s, by_logit_desc);
    int keep = (top_k > 0 && top_k < V) ? top_k : V;
    double total = 0.0;
    for (int i = 0; i < keep; i++) total += exp((double)(s[i].logit - s[0].logit));
    if (top_p < 1.0f) { /* smallest prefix whose probability reaches top_p */
        double cum = 0.0;
        int n = 0;
        while (n < keep) {
            cum += exp((double)(s[n].logit - s[0].logit)) / total;
            n++;
            if (cum >= top_p) break;
        }
        keep = n;
        total = 0.0;
        for (int i = 0; i < keep; i++) total += exp((double)(s[i].logit - s[0].logit));
    }
    double target = u * total, cum = 0.0;
    int32_t tok = s[keep - 1].id;
    for (int i = 0; i < keep; i++) {
        cum += exp((double)(s[i].logit - s[0].logit));
        if (cum > target) {
            tok = s[i].id;
            break;
        }
    }
    free(s);
    return tok;
}
