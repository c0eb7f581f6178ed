/* comm_impl.h - what a communicator implementation provides to comm.c,
 * which does the byte accounting and argument checks for all of them. */
#ifndef KFAC_COMM_IMPL_H
#define KFAC_COMM_IMPL_H

#include "kfac/kfac_comm.h"

typedef struct kfac_comm_ops {
    const char *kind;
    kfac_status (*allreduce)(kfac_comm *c, void *buf, size_t count, kfac_dtype t);
    kfac_status (*reduce_scatterv)(kfac_comm *c, const void *send, void *recv,
                                   const size_t *counts, kfac_dtype t);
    kfac_status (*allgatherv)(kfac_comm *c, void *buf, const size_t *counts, kfac_dtype t);
    kfac_status (*bcast)(kfac_comm *c, void *buf, size_t count, kfac_dtype t, int root);
    kfac_status (*barrier)(kfac_comm *c);
    kfac_status (*iallreduce)(kfac_comm *c, void *buf, size_t count, kfac_dtype t);
    kfac_status (*progress)(kfac_comm *c);
    kfac_status (*wait_all)(kfac_comm *c);
    void (*abort)(kfac_comm *c, int code);
    void (*destroy)(kfac_comm *c);
} kfac_comm_ops;

struct kfac_comm {
    const kfac_comm_ops *ops;
    int rank, size;
    kfac_link successor_link; /* link class of this rank's ring sends */
    kfac_comm_bytes bytes;
    void *impl;
};

/* Allocates a communicator and sets the link class of its ring sends from
 * node_of_rank (NULL: one node). */
kfac_status kfac__comm_create(const kfac_comm_ops *ops, int rank, int size,
                              const int *node_of_rank, void *impl, kfac_comm **out);

/* Sums `count` 16-bit values of src into dst (in float32, rounding once). */
void kfac__sum_f16(uint16_t *dst, const uint16_t *src, size_t count);
void kfac__sum_bf16(uint16_t *dst, const uint16_t *src, size_t count);

#endif
