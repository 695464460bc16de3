/* decode.c -- generation with a KV cache: the cache itself, the cached forward (a prompt of T
 * tokens per row), the decode step (one token per row) and the beam-search reorder.
 *
 * The cache keeps, per layer, k and v [B, KV, cap, hd], and per row the key mask and alibi
 * position of every cached token ([B, cap]), so a decode step uploads only its new key's column.
 */
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"

void ft_cache_free(ft_model *m)
{
    kv_cache *kc = &m->cache;
    ft_backend *be = m->be;
    for (int l = 0; kc->k && l < m->cfg.n_layer; l++) {
        be->ops->free(be, kc->k[l]);
        be->ops->free(be, kc->v[l]);
    }
    free(kc->k);
    free(kc->v);
    if (kc->tmp) be->ops->free(be, kc->tmp);
    if (kc->kmask) be->ops->free(be, kc->kmask);
    if (kc->kpos) be->ops->free(be, kc->kpos);
    if (kc->gather_idx) be->ops->free(be, kc->gather_idx);
    if (kc->step_dev) be->ops->free(be, kc->step_dev);
    if (kc->chain) be->ops->free(be, kc->chain);
    free(kc->seen);
    memset(kc, 0, sizeof *kc);
    m->bind_gen++;
}

int ft_cache_len(const ft_model *m) { return m->cache.len; }

ft_status ft_cache_init(ft_model *m, int B, int capacity, ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (B <= 0 || capacity <= 0) return ft_fail(err, FT_EINVAL, "cache: batch and capacity must be positive");
    const int64_t elems = (int64_t)B * capacity * c->n_kv_head * c->head_dim;
    if (elems > FT_MAX_ELEMS)
        return ft_fail(err, FT_EINVAL, "cache: %d rows x %d tokens need key buffers of %lld elements, more than the "
                       "engine's limit of 2^31 - 1 per tensor", B, capacity, (long long)elems);
    ft_cache_free(m);
    kv_cache *kc = &m->cache;
    const size_t kv_bytes = act_bytes(m, (size_t)B * c->n_kv_head * capacity * c->head_dim);
    kc->k = calloc((size_t)c->n_layer, sizeof(void *));
    kc->v = calloc((size_t)c->n_layer, sizeof(void *));
    kc->seen = calloc((size_t)B, sizeof(int32_t));
    ft_status st = (!kc->k || !kc->v || !kc->seen) ? ft_fail(err, FT_ENOMEM, "out of host memory") : FT_OK;
    for (int l = 0; l < c->n_layer && !st; l++) {
        st = m->be->ops->alloc(m->be, kv_bytes, &kc->k[l], err);
        if (!st) st = m->be->ops->alloc(m->be, kv_bytes, &kc->v[l], err);
    }
    const size_t mask_bytes = (size_t)B * capacity * sizeof(int32_t); /* tmp also reorders the masks */
    if (!st) st = m->be->ops->alloc(m->be, kv_bytes > mask_bytes ? kv_bytes : mask_bytes, &kc->tmp, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * capacity * sizeof(int32_t), (void **)&kc->kmask, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * capacity * sizeof(int32_t), (void **)&kc->kpos, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * sizeof(int32_t), (void **)&kc->gather_idx, err);
    if (!st) st = m->be->ops->alloc(m->be, 2 * sizeof(int32_t), (void **)&kc->step_dev, err);
    if (!st)
        st = m->be->ops->alloc(m->be, (2 * (size_t)B + 2) * capacity * sizeof(int32_t), (void **)&kc->chain, err);
    if (st) {
        ft_cache_free(m);
        if (st == FT_EDEVMEM || st == FT_ENOMEM)
            return ft_fail(err, st, "out of memory allocating the KV cache for %d x %d tokens", B,
                           capacity);
        return st;
    }
    kc->B = B;
    kc->cap = capacity;
    kc->len = 0;
    return FT_OK;
}


/* The cache exists, holds B rows and has room for n more tokens a row (n <= 0: none to add). */
static ft_status cache_room(const ft_model *m, int B, int n, ft_error *err)
{
    const kv_cache *kc = &m->cache;
    if (!kc->k) return ft_fail(err, FT_ESTATE, "no KV cache (cache_init was not called)");
    if (B != kc->B) return ft_fail(err, FT_EINVAL, "batch %d does not match the cache's %d", B, kc->B);
    if (n <= 0 || (int64_t)kc->len + n > kc->cap)
        return ft_fail(err, FT_EINVAL, "KV cache full: %d + %d tokens exceed its capacity %d", kc->len, n, kc->cap);
    return FT_OK;
}

/* ln_f and the lm head over x[B, D] (act) -> host logits [B, V] */
static ft_status head_rows(ft_model *m, const void *x, int B, float *logits, ft_error *err)
{
    const ft_config *c = &m->cfg;
    workspace *ws = &m->ws;
    CALL(m->be->ops->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, x, m->lnf_w, m->lnf_b, B, c->hidden,
                                   c->ln_eps, err));
    return head_logits(m, ws->hf, B, logits, err);
}

ft_status ft_forward_cached(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, float *last_logits,
                            ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    CALL(cache_room(m, B, T, err));
    const int Tk = kc->len + T;
    CALL(check_ids(m, ids, mask, B, T, Tk, 0, err));
    const int N = B * T, D = c->hidden, L = c->n_layer;
    CALL(workspace_ensure(m, N, 0, err));
    workspace *ws = &m->ws;

    /* positions of the new tokens, the key masks over the whole cache, and each row's count of
     * real tokens (its next position: committed to kc->seen only once the step went through) */
    int32_t *host = malloc(((size_t)N + 2 * (size_t)B * Tk + 2 * (size_t)B) * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int32_t *pos = host, *kmask = host + N, *kpos = kmask + (size_t)B * Tk, *last = kpos + (size_t)B * Tk;
    int32_t *row_real = last + B;
    token_positions(mask, B, T, Tk, pos, kmask, kpos, row_real);
    for (int b = 0; b < B; b++) last[b] = b * T + T - 1;
    /* the cache's mask/pos rows are [B, cap]: upload row by row at stride cap */
    ft_status st = op->upload(m->be, ws->ids, ids, (size_t)N * sizeof(int32_t), err);
    if (!st) st = op->upload(m->be, ws->pos, pos, (size_t)N * sizeof(int32_t), err);
    for (int b = 0; b < B && !st; b++) {
        const size_t row = (size_t)b * kc->cap;
        st = op->upload(m->be, kc->kmask + row, kmask + (size_t)b * Tk, (size_t)Tk * sizeof(int32_t), err);
        if (!st) st = op->upload(m->be, kc->kpos + row, kpos + (size_t)b * Tk, (size_t)Tk * sizeof(int32_t), err);
    }
    if (!st) st = op->upload(m->be, kc->gather_idx, last, (size_t)B * sizeof(int32_t), err);

    step_ctx s;
    memset(&s, 0, sizeof s);
    s.B = B; s.T = T; s.N = N; s.Tk = Tk; s.cap = kc->cap; s.past = kc->len; s.kstride = kc->cap;
    s.kmask = kc->kmask; s.kpos = kc->kpos; s.pos = ws->pos;
    if (!st) st = op->embed(m->be, ws->xs[0], ws->ids, m->embed, N, D, err);
    for (int l = 0; l < L && !st; l++)
        st = layer_forward(m, &s, l, &ws->shared, ws->xs[l], ws->xs[l + 1], kc->k[l], kc->v[l], err);
    /* last position of each row -> ln_f -> logits [B, V] */
    if (!st) st = op->gather_rows(m->be, ws->ytmp, ws->xs[L], kc->gather_idx, B, act_bytes(m, D), err);
    if (!st) st = head_rows(m, ws->ytmp, B, last_logits, err);
    if (!st) { /* committed only when the step went through, as decode_step does */
        memcpy(kc->seen, row_real, (size_t)B * sizeof(int32_t));
        kc->len = Tk;
    }
    free(host);
    return st;
}

enum { HEAD_LOGITS = 0, HEAD_ARGMAX = 1, HEAD_NONE = 2 }; /* the first two are replay slots */
_Static_assert((int)HEAD_ARGMAX < (int)REPLAY_SLOT_DECODE_END, "a replay slot per recorded head kind");

/* The device work of one decode step after `past` cached tokens (the step's ids, positions, key
 * column and {past, Tk} are already uploaded): embedding, layers, then per `head`: ln_f + lm head
 * into ws->logits (B <= ws->chunk), the same plus the greedy ids into ws->tgt, or nothing (the
 * caller runs head_rows). Past and Tk are read on the device, so the same launches serve every
 * step: a captured graph of them is replayed (the host's `past` serves backends that run the ops
 * directly, and the recording call). */
static ft_status decode_body(ft_model *m, int B, int past, int head, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    workspace *ws = &m->ws;
    step_ctx s;
    memset(&s, 0, sizeof s);
    s.B = B; s.T = 1; s.N = B; s.Tk = past + 1; s.cap = kc->cap; s.past = past; s.kstride = kc->cap;
    s.kmask = kc->kmask; s.kpos = kc->kpos; s.pos = ws->pos;
    s.past_dev = kc->step_dev;
    s.tk_dev = kc->step_dev + 1;
    CALL(op->embed(m->be, ws->xs[0], ws->ids, m->embed, B, c->hidden, err));
    for (int l = 0; l < c->n_layer; l++)
        CALL(layer_forward(m, &s, l, &ws->shared, ws->xs[l], ws->xs[l + 1], kc->k[l], kc->v[l], err));
    if (head == HEAD_NONE) return FT_OK;
    CALL(op->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, ws->xs[c->n_layer], m->lnf_w, m->lnf_b, B, c->hidden,
                           c->ln_eps, err));
    for (int r0 = 0; r0 < B; r0 += ws->chunk) { /* one chunk unless argmax over many rows */
        const int n = B - r0 < ws->chunk ? B - r0 : ws->chunk;
        CALL(op->lm_logits(m->be, ws->logits, (const char *)ws->hf + act_bytes(m, (size_t)r0 * c->hidden), m->lm_head,
                           n, c->vocab_size, c->hidden, err));
        if (head == HEAD_ARGMAX) CALL(op->argmax_rows(m->be, ws->logits, n, c->vocab_size, ws->tgt + r0, err));
    }
    return FT_OK;
}

typedef struct decode_call {
    ft_model *m;
    int B, past, head;
} decode_call;

static ft_status decode_call_body(void *ctx, ft_error *err)
{
    const decode_call *d = ctx;
    return decode_body(d->m, d->B, d->past, d->head, err);
}

/* decode_body, replayed by the backend where it records steps (CUDA graphs): one slot per head
 * kind, keyed by bind_gen so that a recording never outlives the buffers it was made with. */
static ft_status decode_run(ft_model *m, int B, int past, int head, ft_error *err)
{
    const ft_backend_ops *op = m->be->ops;
    if (!op->replay || head == HEAD_NONE) return decode_body(m, B, past, head, err);
    decode_call d = {m, B, past, head};
    return op->replay(m->be, head, m->bind_gen, decode_call_body, &d, err);
}

/* One token per row appended to the cache. Only the new key's mask and position are uploaded
 * (the cache keeps [B, cap] rows), not the whole history as forward_cached does. */
ft_status ft_decode_step(ft_model *m, const int32_t *ids, const int32_t *mask, int B, float *last_logits,
                         int32_t *out_ids, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    CALL(cache_room(m, B, 1, err));
    if (!last_logits == !out_ids) return ft_fail(err, FT_EINVAL, "decode_step: ask for logits or for ids");
    CALL(check_ids(m, ids, mask, B, 1, 1, 0, err));
    const int past = kc->len;
    CALL(workspace_ensure(m, B, 0, err));
    workspace *ws = &m->ws;

    /* new token of row b: position seen[b]; its key: mask[b], alibi position seen[b] (0 if padding) */
    int32_t *host = malloc(3 * (size_t)B * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int32_t *pos = host, *km = host + B, *kp = host + 2 * B;
    for (int b = 0; b < B; b++) {
        pos[b] = kc->seen[b];
        km[b] = mask ? mask[b] : 1;
        kp[b] = km[b] ? kc->seen[b] : 0;
    }
    ft_status st = op->upload(m->be, ws->ids, ids, (size_t)B * sizeof(int32_t), err);
    if (!st) st = op->upload(m->be, ws->pos, pos, (size_t)B * sizeof(int32_t), err);
    for (int b = 0; b < B && !st; b++) {
        const size_t at = (size_t)b * kc->cap + past;
        st = op->upload(m->be, kc->kmask + at, km + b, sizeof(int32_t), err);
        if (!st) st = op->upload(m->be, kc->kpos + at, kp + b, sizeof(int32_t), err);
    }
    if (st) {
        free(host);
        return st;
    }

    const int32_t step[2] = {past, past + 1};
    const int head = out_ids ? HEAD_ARGMAX : B <= ws->chunk ? HEAD_LOGITS : HEAD_NONE;
    st = op->upload(m->be, kc->step_dev, step, sizeof step, err);
    if (!st) st = decode_run(m, B, past, head, err);
    if (!st && head == HEAD_ARGMAX) st = op->download(m->be, out_ids, ws->tgt, (size_t)B * sizeof(int32_t), err);
    if (!st && head == HEAD_LOGITS)
        st = op->download(m->be, last_logits, ws->logits, (size_t)B * c->vocab_size * sizeof(float), err);
    if (!st && head == HEAD_NONE) st = head_rows(m, ws->xs[c->n_layer], B, last_logits, err);
    if (!st) { /* committed only when the step went through */
        for (int b = 0; b < B; b++) kc->seen[b] += km[b];
        kc->len = past + 1;
    }
    free(host);
    return st;
}

/* n greedy tokens per row, the host out of the loop: each step's argmax (on the device) is copied
 * into the next step's ids, and into row i of the cache's chain buffer, downloaded once at the
 * end. Every key is a real token (decode_step's mask of ones), so the key masks and positions of
 * all n steps are known up front and uploaded before the first step; each step then copies its
 * query positions and {past, Tk} from the chain buffer (one-row gather_rows copies) instead of
 * uploading them: a copy from pageable host memory may make the host wait for the stream (CUDA's
 * API synchronization rules), a device-to-device copy does not, so the whole chunk is enqueued
 * without waiting. The result equals n decode_step(ids, NULL, out_ids) calls, each fed the
 * previous one's ids. */
ft_status ft_decode_greedy(ft_model *m, const int32_t *ids, int B, int n, int32_t *out_ids, ft_error *err)
{
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    if (n <= 0) return ft_fail(err, FT_EINVAL, "decode_greedy: the number of tokens must be positive, got %d", n);
    CALL(cache_room(m, B, n, err));
    CALL(check_ids(m, ids, NULL, B, 1, 1, 0, err));
    const int past = kc->len;
    CALL(workspace_ensure(m, B, 0, err));
    workspace *ws = &m->ws;

    /* host, in the order of the chain buffer after the results: the query positions [n, B] and
     * {past, Tk} [n, 2] of every step; then one row's n key positions and the n key masks (ones) */
    const size_t nb = (size_t)n * B, steps_len = nb + 2 * (size_t)n, row = (size_t)B * sizeof(int32_t);
    int32_t *host = malloc((steps_len + 2 * (size_t)n) * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int32_t *pos = host, *step = host + nb, *kp = host + steps_len, *ones = kp + n;
    for (int i = 0; i < n; i++) {
        for (int b = 0; b < B; b++) pos[(size_t)i * B + b] = kc->seen[b] + i;
        step[2 * i] = past + i;
        step[2 * i + 1] = past + i + 1;
        ones[i] = 1;
    }
    int32_t *tok = kc->chain, *dev_pos = tok + nb, *dev_step = dev_pos + nb; /* n <= cap: it fits */
    ft_status st = FT_OK;
    for (int b = 0; b < B && !st; b++) {
        const size_t at = (size_t)b * kc->cap + past;
        for (int i = 0; i < n; i++) kp[i] = kc->seen[b] + i;
        st = op->upload(m->be, kc->kmask + at, ones, (size_t)n * sizeof(int32_t), err);
        if (!st) st = op->upload(m->be, kc->kpos + at, kp, (size_t)n * sizeof(int32_t), err);
    }
    if (!st) st = op->upload(m->be, dev_pos, pos, steps_len * sizeof(int32_t), err);
    const int32_t zero = 0; /* gather_idx[0] = 0: gather_rows of one row is a plain device copy */
    if (!st) st = op->upload(m->be, kc->gather_idx, &zero, sizeof zero, err);
    if (!st) st = op->upload(m->be, ws->ids, ids, row, err);
    const int32_t *row0 = kc->gather_idx;
    for (int i = 0; i < n && !st; i++) {
        st = op->gather_rows(m->be, ws->pos, dev_pos + (size_t)i * B, row0, 1, row, err);
        if (!st) st = op->gather_rows(m->be, kc->step_dev, dev_step + 2 * (size_t)i, row0, 1, 2 * sizeof(int32_t), err);
        if (!st) st = decode_run(m, B, past + i, HEAD_ARGMAX, err);
        if (!st) st = op->gather_rows(m->be, tok + (size_t)i * B, ws->tgt, row0, 1, row, err);
        if (!st && i + 1 < n) st = op->gather_rows(m->be, ws->ids, ws->tgt, row0, 1, row, err);
    }
    if (!st) st = op->download(m->be, out_ids, tok, nb * sizeof(int32_t), err);
    if (!st) { /* committed only when every step went through */
        for (int b = 0; b < B; b++) kc->seen[b] += n;
        kc->len = past + n;
    }
    free(host);
    return st;
}

ft_status ft_cache_reorder(ft_model *m, const int32_t *src, int B, ft_error *err)
{
    kv_cache *kc = &m->cache;
    const ft_config *c = &m->cfg;
    if (!kc->k) return ft_fail(err, FT_ESTATE, "no KV cache to reorder");
    if (B != kc->B) return ft_fail(err, FT_EINVAL, "reorder: %d rows for a cache of %d", B, kc->B);
    for (int b = 0; b < B; b++)
        if (src[b] < 0 || src[b] >= B) return ft_fail(err, FT_EINVAL, "reorder: row %d out of range", (int)src[b]);
    const size_t row = act_bytes(m, (size_t)c->n_kv_head * kc->cap * c->head_dim);
    int32_t *ident = malloc((size_t)B * sizeof(int32_t));
    if (!ident) return ft_fail(err, FT_ENOMEM, "out of host memory");
    for (int b = 0; b < B; b++) ident[b] = b;
    ft_status st = FT_OK;
    /* every layer's k and v, then the key masks and positions ([B, cap] int32: tmp holds them) */
    for (int l = 0; l <= c->n_layer && !st; l++) {
        void *bufs[2];
        size_t rb = row;
        if (l < c->n_layer) {
            bufs[0] = kc->k[l];
            bufs[1] = kc->v[l];
        } else {
            bufs[0] = kc->kmask;
            bufs[1] = kc->kpos;
            rb = (size_t)kc->cap * sizeof(int32_t);
        }
        for (int i = 0; i < 2 && !st; i++) {
            st = m->be->ops->upload(m->be, kc->gather_idx, src, (size_t)B * sizeof(int32_t), err);
            if (!st) st = m->be->ops->gather_rows(m->be, kc->tmp, bufs[i], kc->gather_idx, B, rb, err);
            if (!st) st = m->be->ops->upload(m->be, kc->gather_idx, ident, (size_t)B * sizeof(int32_t), err);
            if (!st) st = m->be->ops->gather_rows(m->be, bufs[i], kc->tmp, kc->gather_idx, B, rb, err);
        }
    }
    if (!st) { /* host counters follow their rows */
        for (int b = 0; b < B; b++) ident[b] = kc->seen[src[b]];
        memcpy(kc->seen, ident, (size_t)B * sizeof(int32_t));
    }
    free(ident);
    return st;
}
