/* kfac_dtype.h - element types shared by the backends (activation storage)
 * and the communicator (message payloads), and host float32 <-> 16-bit
 * conversions. */
#ifndef KFAC_DTYPE_H
#define KFAC_DTYPE_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* F64 is for the few scalars whose sums must not round (e.g. the KL clip). */
typedef enum kfac_dtype { KFAC_F32 = 0, KFAC_F16 = 1, KFAC_BF16 = 2, KFAC_F64 = 3 } kfac_dtype;
size_t kfac_dtype_size(kfac_dtype t);
/* "f32", "f16", "bf16", "f64"; parse returns KFAC_EINVAL for anything else. */
const char *kfac_dtype_name(kfac_dtype t);
kfac_status kfac_dtype_parse(const char *name, kfac_dtype *out);

/* float32 <-> 16-bit conversions (round to nearest even). */
uint16_t kfac_f32_to_f16(float x);
float kfac_f16_to_f32(uint16_t h);
uint16_t kfac_f32_to_bf16(float x);
float kfac_bf16_to_f32(uint16_t h);
/* The same for a 16-bit type t named at run time (KFAC_F16 or KFAC_BF16). */
uint16_t kfac_f32_to_16(kfac_dtype t, float x);
float kfac_16_to_f32(kfac_dtype t, uint16_t h);

#ifdef __cplusplus
}
#endif
#endif
