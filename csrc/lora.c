/* lora.c -- LoRA storage: parameters, gradients and AdamW moments of every adapted module.
 *
 * One f32 backend buffer per slot (ft_lora_slot), the modules laid out layer by layer, A [r, in]
 * then B [out, r]; lora_off gives each module's offset (SIZE_MAX: not adapted). The layer code
 * finds a module's A and B with lora_locate.
 */
#include <math.h>
#include <stdlib.h>

#include "model_internal.h"

ft_status ft_lora_init(ft_model *m, int r, float alpha, float dropout, unsigned target_mask, ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (r <= 0 || r > 4096) return ft_fail(err, FT_EINVAL, "lora r must be in [1, 4096], got %d", r);
    if (!isfinite(alpha)) return ft_fail(err, FT_EINVAL, "lora alpha must be finite, got %g", (double)alpha);
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return ft_fail(err, FT_EINVAL, "lora dropout must be in [0, 1), got %g", (double)dropout);
    if (!target_mask || target_mask >= (1u << FT_NMOD))
        return ft_fail(err, FT_EINVAL, "lora target modules: mask 0x%x is not a non-empty set of the %d modules",
                       target_mask, FT_NMOD);
    ft_lora_remove(m);
    workspace_free(m); /* xa buffers depend on r */
    m->lora_off = malloc((size_t)c->n_layer * FT_NMOD * sizeof(size_t));
    if (!m->lora_off) return ft_fail(err, FT_ENOMEM, "out of host memory");
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++)
        for (int mod = 0; mod < FT_NMOD; mod++) {
            if (!(target_mask & (1u << mod))) {
                m->lora_off[l * FT_NMOD + mod] = SIZE_MAX;
                continue;
            }
            m->lora_off[l * FT_NMOD + mod] = n;
            n += (size_t)r * mod_in(c, mod) + (size_t)mod_out(c, mod, m->qkv_width) * r;
        }
    for (int s = 0; s < 4; s++) {
        ft_status st = m->be->ops->alloc(m->be, n * sizeof(float), (void **)&m->lora_buf[s], err);
        if (!st) st = m->be->ops->zero(m->be, m->lora_buf[s], n * sizeof(float), err);
        if (st) {
            ft_lora_remove(m);
            return st;
        }
    }
    m->lora_n = n;
    m->lora_r = r;
    m->lora_scale = alpha / (float)r;
    m->lora_dropout = dropout;
    m->lora_targets = target_mask;
    m->lora_min_layer = 0;
    m->bind_gen++; /* recorded decode steps hold the old adapter's buffers and scale */
    return FT_OK;
}

void ft_lora_remove(ft_model *m)
{
    m->bind_gen++;
    for (int s = 0; s < 4; s++) {
        if (m->lora_buf[s]) m->be->ops->free(m->be, m->lora_buf[s]);
        m->lora_buf[s] = NULL;
    }
    free(m->lora_off);
    m->lora_off = NULL;
    m->lora_n = 0;
    m->lora_r = 0;
    m->lora_targets = 0;
    m->lora_min_layer = m->cfg.n_layer;
}

int ft_lora_rank(const ft_model *m) { return m->lora_r; }
unsigned ft_lora_targets(const ft_model *m) { return m->lora_targets; }
float ft_lora_scale(const ft_model *m) { return m->lora_scale; }

ft_status ft_lora_set_dropout(ft_model *m, float dropout, ft_error *err)
{
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return ft_fail(err, FT_EINVAL, "lora dropout must be in [0, 1), got %g", (double)dropout);
    m->lora_dropout = dropout;
    m->bind_gen++; /* a recorded training step passes the old probability */
    return FT_OK;
}

ft_status lora_locate(const ft_model *m, ft_lora_slot slot, int layer, int mod, float **A, float **B,
                      size_t *na, size_t *nb, ft_error *err)
{
    *A = *B = NULL;
    *na = *nb = 0;
    if (!m->lora_r) return ft_fail(err, FT_ESTATE, "the model has no LoRA adapter");
    if (slot < FT_LORA_WEIGHT || slot > FT_LORA_ADAM_V) return ft_fail(err, FT_EINVAL, "bad LoRA slot");
    if (layer < 0 || layer >= m->cfg.n_layer || mod < 0 || mod >= FT_NMOD)
        return ft_fail(err, FT_EINVAL, "LoRA layer %d / module %d out of range", layer, mod);
    size_t off = m->lora_off[layer * FT_NMOD + mod];
    if (off == SIZE_MAX)
        return ft_fail(err, FT_EINVAL, "layer %d: %s has no LoRA (targets do not include it)", layer,
                       ft_module_name(mod));
    *na = (size_t)m->lora_r * mod_in(&m->cfg, mod);
    *nb = (size_t)mod_out(&m->cfg, mod, m->qkv_width) * m->lora_r;
    *A = m->lora_buf[slot] + off;
    *B = *A + *na;
    return FT_OK;
}

ft_status ft_lora_read(ft_model *m, ft_lora_slot slot, int layer, int mod, float *A, float *B, ft_error *err)
{
    float *dA, *dB;
    size_t na, nb;
    CALL(lora_locate(m, slot, layer, mod, &dA, &dB, &na, &nb, err));
    CALL(m->be->ops->download(m->be, A, dA, na * sizeof(float), err));
    return m->be->ops->download(m->be, B, dB, nb * sizeof(float), err);
}

ft_status ft_lora_write(ft_model *m, ft_lora_slot slot, int layer, int mod, const float *A, const float *B,
                        ft_error *err)
{
    float *dA, *dB;
    size_t na, nb;
    CALL(lora_locate(m, slot, layer, mod, &dA, &dB, &na, &nb, err));
    for (size_t i = 0; i < na; i++)
        if (!isfinite(A[i])) return ft_fail(err, FT_EINVAL, "layer %d %s lora_A: non-finite value at %zu", layer, ft_module_name(mod), i);
    for (size_t i = 0; i < nb; i++)
        if (!isfinite(B[i])) return ft_fail(err, FT_EINVAL, "layer %d %s lora_B: non-finite value at %zu", layer, ft_module_name(mod), i);
    CALL(m->be->ops->upload(m->be, dA, A, na * sizeof(float), err));
    return m->be->ops->upload(m->be, dB, B, nb * sizeof(float), err);
}

size_t ft_lora_numel(const ft_model *m) { return m->lora_r ? m->lora_n : 0; }

ft_status ft_lora_grad_flat(ft_model *m, float *host, size_t n, int write, ft_error *err)
{
    if (!m->lora_r) return ft_fail(err, FT_ESTATE, "the model has no LoRA adapter");
    if (n != m->lora_n)
        return ft_fail(err, FT_EINVAL, "flat LoRA gradient: expected %zu floats, got %zu", m->lora_n, n);
    /* no finiteness check on write: an overflowed sum is what fp16 loss scaling detects (AdamW skips it) */
    if (!write) return m->be->ops->download(m->be, host, m->lora_buf[FT_LORA_GRAD], n * sizeof(float), err);
    return m->be->ops->upload(m->be, m->lora_buf[FT_LORA_GRAD], host, n * sizeof(float), err);
}

ft_status ft_zero_grad(ft_model *m, ft_error *err)
{
    if (!m->lora_r) return FT_OK;
    return m->be->ops->zero(m->be, m->lora_buf[FT_LORA_GRAD], m->lora_n * sizeof(float), err);
}
