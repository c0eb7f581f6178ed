/* backend.c - backend registry: the one place that knows which backends
 * this build has. */
#include <string.h>

#include "kfac/kfac_backend.h"

void kfac_conv_desc_init(kfac_conv_desc *d, int n, int h, int w, int c, int k, int kh, int kw,
                         int stride, int pad)
{
    d->n = n; d->h = h; d->w = w; d->c = c;
    d->k = k; d->kh = kh; d->kw = kw;
    d->stride = stride; d->pad = pad;
    d->ho = (h + 2 * pad - kh) / stride + 1;
    d->wo = (w + 2 * pad - kw) / stride + 1;
}

void kfac_pool_desc_init(kfac_pool_desc *d, int n, int h, int w, int c, int k, int stride, int pad)
{
    d->n = n; d->h = h; d->w = w; d->c = c;
    d->kh = k; d->kw = k; d->stride = stride; d->pad = pad;
    d->ho = (h + 2 * pad - k) / stride + 1;
    d->wo = (w + 2 * pad - k) / stride + 1;
}

kfac_status kfac_backend_get(const char *name, int threads, kfac_backend **out)
{
    *out = NULL;
    if (strcmp(name, "cpu") == 0) return kfac_backend_cpu_init(threads, out);
    if (strcmp(name, "cuda") == 0) {
#ifdef KFAC_HAVE_CUDA
        return kfac_backend_cuda_init(0, out);
#else
        return KFAC_ERR(KFAC_ENOTSUP, "backend 'cuda': this build has no CUDA (configure with -DKFAC_CUDA=ON)");
#endif
    }
    return KFAC_ERR(KFAC_EINVAL, "unknown backend '%s' (known: cpu, cuda)", name);
}

void kfac_backend_free(kfac_backend *be)
{
    if (be) be->destroy(be);
}

kfac_status kfac_backend_set_precision(kfac_backend *be, kfac_dtype t)
{
    if (t == be->act_dtype) return KFAC_OK;
    if (t != KFAC_F32 && t != KFAC_BF16 && t != KFAC_F16)
        return KFAC_ERR(KFAC_EINVAL, "precision %s: activations are f32, bf16 or f16",
                        kfac_dtype_name(t));
    if (!be->set_precision)
        return KFAC_ERR(KFAC_ENOTSUP,
                        "backend '%s' stores activations in f32 only (%s needs device cuda)",
                        be->name, kfac_dtype_name(t));
    return be->set_precision(be, t);
}

kfac_status kfac_backend_set_tf32(kfac_backend *be, int on)
{
    if (!be->set_tf32) {
        if (!on) return KFAC_OK;
        return KFAC_ERR(KFAC_ENOTSUP, "backend '%s' has no TF32 (tf32 needs device cuda)",
                        be->name);
    }
    return be->set_tf32(be, on);
}

kfac_status kfac_backend_set_precision_name(kfac_backend *be, const char *name)
{
    int tf32 = strcmp(name, "tf32") == 0;
    kfac_dtype t;
    KFAC_TRY(kfac_dtype_parse(tf32 ? "f32" : name, &t));
    KFAC_TRY(kfac_backend_set_precision(be, t));
    return tf32 ? kfac_backend_set_tf32(be, 1) : KFAC_OK;
}
