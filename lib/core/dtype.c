/* dtype.c - element types: sizes, names, host conversions (kfac_dtype.h). */
#include <string.h>

#include "kfac/kfac_dtype.h"

size_t kfac_dtype_size(kfac_dtype t) { return t == KFAC_F64 ? 8 : t == KFAC_F32 ? 4 : 2; }

const char *kfac_dtype_name(kfac_dtype t)
{
    static const char *names[] = {"f32", "f16", "bf16", "f64"};
    return names[t];
}

kfac_status kfac_dtype_parse(const char *name, kfac_dtype *out)
{
    static const kfac_dtype all[] = {KFAC_F32, KFAC_F16, KFAC_BF16, KFAC_F64};
    for (int i = 0; i < 4; i++)
        if (strcmp(name, kfac_dtype_name(all[i])) == 0) {
            *out = all[i];
            return KFAC_OK;
        }
    return KFAC_ERR(KFAC_EINVAL, "element type '%s': expected f32, f16, bf16 or f64", name);
}

uint16_t kfac_f32_to_f16(float x)
{
    _Float16 h = (_Float16)x; /* round to nearest even (F16C / soft-float) */
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}

float kfac_f16_to_f32(uint16_t bits)
{
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}

uint16_t kfac_f32_to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float kfac_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

uint16_t kfac_f32_to_16(kfac_dtype t, float x)
{
    return t == KFAC_F16 ? kfac_f32_to_f16(x) : kfac_f32_to_bf16(x);
}

float kfac_16_to_f32(kfac_dtype t, uint16_t h)
{
    return t == KFAC_F16 ? kfac_f16_to_f32(h) : kfac_bf16_to_f32(h);
}
