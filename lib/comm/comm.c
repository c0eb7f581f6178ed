/* comm.c - the communicator front end (argument checks, the ring byte
 * model and its counters, 16-bit sums) and the single-process
 * implementation. */
#include <stdlib.h>
#include <string.h>

#include "comm/comm_impl.h"

/* ---- 16-bit sums ---- */

void kfac__sum_f16(uint16_t *dst, const uint16_t *src, size_t count)
{
    for (size_t i = 0; i < count; i++)
        dst[i] = kfac_f32_to_f16(kfac_f16_to_f32(dst[i]) + kfac_f16_to_f32(src[i]));
}

void kfac__sum_bf16(uint16_t *dst, const uint16_t *src, size_t count)
{
    for (size_t i = 0; i < count; i++)
        dst[i] = kfac_f32_to_bf16(kfac_bf16_to_f32(dst[i]) + kfac_bf16_to_f32(src[i]));
}

/* ---- the ring byte model (see kfac_comm.h) ---- */

uint64_t kfac_comm_ring_bytes_allreduce(int size, size_t count, kfac_dtype t)
{
    /* reduce-scatter + allgather of P blocks: each rank sends 2(P-1) of them
     * (blocks of count/P elements, the remainder spread over the first). */
    if (size <= 1) return 0;
    return 2 * (uint64_t)(size - 1) * count * kfac_dtype_size(t) / (uint64_t)size;
}

uint64_t kfac_comm_ring_bytes_reduce_scatterv(int size, int rank, const size_t *counts,
                                              kfac_dtype t)
{
    uint64_t total = 0;
    if (size <= 1) return 0;
    for (int r = 0; r < size; r++) total += counts[r];
    return (total - counts[rank]) * kfac_dtype_size(t);
}

uint64_t kfac_comm_ring_bytes_allgatherv(int size, int rank, const size_t *counts, kfac_dtype t)
{
    uint64_t total = 0;
    if (size <= 1) return 0;
    for (int r = 0; r < size; r++) total += counts[r];
    return (total - counts[(rank + 1) % size]) * kfac_dtype_size(t);
}

static void count_bytes(kfac_comm *c, kfac_comm_stage s, uint64_t bytes)
{
    c->bytes.sent[s][c->successor_link] += bytes;
    c->bytes.calls[s]++;
}

const char *kfac_comm_stage_name(kfac_comm_stage s)
{
    static const char *names[KFAC_STAGE_COUNT] = {"grad_allreduce", "factor_reduce",
                                                  "grad_reduce", "precond_gather", "other"};
    return s < KFAC_STAGE_COUNT ? names[s] : "?";
}

/* ---- front end ---- */

kfac_status kfac__comm_create(const kfac_comm_ops *ops, int rank, int size,
                              const int *node_of_rank, void *impl, kfac_comm **out)
{
    kfac_comm *c = calloc(1, sizeof *c);
    if (!c) return KFAC_ERR(KFAC_ENOMEM, "comm: out of memory");
    c->ops = ops;
    c->rank = rank;
    c->size = size;
    c->impl = impl;
    int next = (rank + 1) % size;
    c->successor_link = node_of_rank && node_of_rank[rank] != node_of_rank[next] ? KFAC_LINK_INTER
                                                                                  : KFAC_LINK_INTRA;
    *out = c;
    return KFAC_OK;
}

void kfac_comm_free(kfac_comm *c)
{
    if (!c) return;
    if (c->ops->destroy) c->ops->destroy(c);
    free(c);
}

int kfac_comm_rank(const kfac_comm *c) { return c->rank; }
int kfac_comm_size(const kfac_comm *c) { return c->size; }
const char *kfac_comm_kind(const kfac_comm *c) { return c->ops->kind; }

kfac_status kfac_comm_allreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t,
                                kfac_comm_stage s)
{
    count_bytes(c, s, kfac_comm_ring_bytes_allreduce(c->size, count, t));
    return count && c->size > 1 ? c->ops->allreduce(c, buf, count, t) : KFAC_OK;
}

kfac_status kfac_comm_reduce_scatterv(kfac_comm *c, const void *send, void *recv,
                                      const size_t *counts, kfac_dtype t, kfac_comm_stage s)
{
    count_bytes(c, s, kfac_comm_ring_bytes_reduce_scatterv(c->size, c->rank, counts, t));
    if (c->size == 1) {
        memcpy(recv, send, counts[0] * kfac_dtype_size(t));
        return KFAC_OK;
    }
    return c->ops->reduce_scatterv(c, send, recv, counts, t);
}

kfac_status kfac_comm_allgatherv(kfac_comm *c, void *buf, const size_t *counts, kfac_dtype t,
                                 kfac_comm_stage s)
{
    count_bytes(c, s, kfac_comm_ring_bytes_allgatherv(c->size, c->rank, counts, t));
    return c->size > 1 ? c->ops->allgatherv(c, buf, counts, t) : KFAC_OK;
}

kfac_status kfac_comm_bcast(kfac_comm *c, void *buf, size_t count, kfac_dtype t, int root,
                            kfac_comm_stage s)
{
    if (root < 0 || root >= c->size)
        return KFAC_ERR(KFAC_EINVAL, "comm: bcast root %d outside [0, %d)", root, c->size);
    int chain_end = (root + c->size - 1) % c->size;
    count_bytes(c, s, c->size > 1 && c->rank != chain_end ? count * kfac_dtype_size(t) : 0);
    return count && c->size > 1 ? c->ops->bcast(c, buf, count, t, root) : KFAC_OK;
}

kfac_status kfac_comm_barrier(kfac_comm *c)
{
    return c->size > 1 ? c->ops->barrier(c) : KFAC_OK;
}

kfac_status kfac_comm_iallreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t,
                                 kfac_comm_stage s)
{
    count_bytes(c, s, kfac_comm_ring_bytes_allreduce(c->size, count, t));
    return count && c->size > 1 ? c->ops->iallreduce(c, buf, count, t) : KFAC_OK;
}

kfac_status kfac_comm_progress(kfac_comm *c)
{
    return c->size > 1 && c->ops->progress ? c->ops->progress(c) : KFAC_OK;
}

kfac_status kfac_comm_wait_all(kfac_comm *c)
{
    return c->size > 1 ? c->ops->wait_all(c) : KFAC_OK;
}

void kfac_comm_get_bytes(const kfac_comm *c, kfac_comm_bytes *out) { *out = c->bytes; }
void kfac_comm_reset_bytes(kfac_comm *c) { memset(&c->bytes, 0, sizeof c->bytes); }

void kfac_comm_abort(kfac_comm *c, int code)
{
    if (c && c->ops->abort) c->ops->abort(c, code);
    exit(code);
}

/* ---- one process ---- */

static const kfac_comm_ops self_ops = {.kind = "self"};

kfac_status kfac_comm_self(kfac_comm **out)
{
    return kfac__comm_create(&self_ops, 0, 1, NULL, NULL, out);
}
