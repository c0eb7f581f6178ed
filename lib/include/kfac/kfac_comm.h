/* kfac_comm.h - communicators: the collectives distributed training needs,
 * behind one interface with three implementations:
 *   self  one process, no library (every collective is a local copy);
 *   mpi   Open MPI on host buffers (MPI_COMM_WORLD or any sub-communicator);
 *   nccl  NCCL on device buffers (built when CUDA is on).
 *
 * Reductions are sums.  Element types: float32, float16 and bfloat16 (the
 * 16-bit types are summed in float32 and rounded once per partner, so their
 * error grows with the world size; use them for K-FAC factor traffic, not
 * for gradients that must match to fp32 tolerance).
 *
 * Byte accounting.  Every collective adds to counters per stage (who asked:
 * gradients, factors, ...) and per link class (intra- or inter-node).  The
 * count is what this rank sends under the ring schedules MPI and NCCL use
 * for large messages, each rank sending only to its ring successor (rank+1
 * mod size, ranks ordered by node): allreduce 2(P-1)/P x n, reduce-scatter
 * of blocks c_0..c_{P-1}: n - c_rank, allgather: n - c_{rank+1}, bcast
 * (pipelined chain from the root): n unless this rank is the chain's end.
 * Summed over ranks these are the textbook volumes 2(P-1)n, (P-1)n,
 * (P-1)n, (P-1)n; the link class is that of (rank, successor).  It is a
 * model of the wire, exact for the ring algorithms and independent of the
 * algorithm MPI picks at run time, so a step's bytes follow from the layer
 * shapes and the world size (tests/mpi checks that).
 */
#ifndef KFAC_COMM_H
#define KFAC_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_dtype.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Who a collective serves, for the byte counters. */
typedef enum kfac_comm_stage {
    KFAC_STAGE_GRAD_ALLREDUCE = 0, /* data-parallel gradient all-reduce */
    KFAC_STAGE_FACTOR_REDUCE,      /* K-FAC factors to their owners */
    KFAC_STAGE_GRAD_REDUCE,        /* K-FAC layer gradients to their owners */
    KFAC_STAGE_PRECOND_GATHER,     /* preconditioned gradients to everyone */
    KFAC_STAGE_OTHER,              /* scalars, BN statistics, evaluation */
    KFAC_STAGE_COUNT
} kfac_comm_stage;
const char *kfac_comm_stage_name(kfac_comm_stage s);

typedef enum kfac_link { KFAC_LINK_INTRA = 0, KFAC_LINK_INTER = 1, KFAC_LINK_COUNT } kfac_link;

typedef struct kfac_comm_bytes {
    uint64_t sent[KFAC_STAGE_COUNT][KFAC_LINK_COUNT];
    uint64_t calls[KFAC_STAGE_COUNT];
} kfac_comm_bytes;

typedef struct kfac_comm kfac_comm;

/* One process, no communication library. */
kfac_status kfac_comm_self(kfac_comm **out);

/* MPI over `mpi_comm` (an MPI_Comm passed as a pointer to it, so this header
 * needs no mpi.h; it is duplicated, the caller keeps its own).  node_of_rank
 * (size entries, may be NULL: all one node) sets the link classes.
 * KFAC_ENOTSUP when the library was built without MPI. */
kfac_status kfac_comm_mpi(const void *mpi_comm, const int *node_of_rank, kfac_comm **out);

/* NCCL on device buffers, set up over an MPI communicator (the unique id
 * travels over MPI); `device` is the CUDA device of this rank.  KFAC_ENOTSUP
 * when built without CUDA/NCCL. */
kfac_status kfac_comm_nccl(const void *mpi_comm, const int *node_of_rank, int device,
                           kfac_comm **out);

void kfac_comm_free(kfac_comm *c);

int kfac_comm_rank(const kfac_comm *c);
int kfac_comm_size(const kfac_comm *c);
const char *kfac_comm_kind(const kfac_comm *c); /* "self", "mpi", "nccl" */

/* In place: buf (count elements) becomes the sum over ranks. */
kfac_status kfac_comm_allreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t,
                                kfac_comm_stage s);
/* send holds size blocks, block r (counts[r] elements) for rank r, in rank
 * order; recv (counts[rank] elements, not overlapping send) receives the
 * sum over ranks of block `rank`. */
kfac_status kfac_comm_reduce_scatterv(kfac_comm *c, const void *send, void *recv,
                                      const size_t *counts, kfac_dtype t, kfac_comm_stage s);
/* In place: buf holds size blocks (counts[r] elements each, in rank order);
 * each rank's own block is sent to all. */
kfac_status kfac_comm_allgatherv(kfac_comm *c, void *buf, const size_t *counts, kfac_dtype t,
                                 kfac_comm_stage s);
kfac_status kfac_comm_bcast(kfac_comm *c, void *buf, size_t count, kfac_dtype t, int root,
                            kfac_comm_stage s);
kfac_status kfac_comm_barrier(kfac_comm *c);

/* Nonblocking all-reduce for gradient buckets (MPI: MPI_Iallreduce; self and
 * nccl complete at once).  At most KFAC_COMM_MAX_PENDING in flight;
 * kfac_comm_progress lets MPI advance them (call it between layers);
 * kfac_comm_wait_all completes every pending one. */
#define KFAC_COMM_MAX_PENDING 256
kfac_status kfac_comm_iallreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t,
                                 kfac_comm_stage s);
kfac_status kfac_comm_progress(kfac_comm *c);
kfac_status kfac_comm_wait_all(kfac_comm *c);

/* Byte counters since creation or the last reset. */
void kfac_comm_get_bytes(const kfac_comm *c, kfac_comm_bytes *out);
void kfac_comm_reset_bytes(kfac_comm *c);

/* Ends the job from any rank: MPI_Abort with `code` (self: exit). */
void kfac_comm_abort(kfac_comm *c, int code);

/* The bytes this rank sends for one collective under the ring model above
 * (exposed so callers and tests can predict them).  `link` receives the link
 * class of this rank's sends. */
uint64_t kfac_comm_ring_bytes_allreduce(int size, size_t count, kfac_dtype t);
uint64_t kfac_comm_ring_bytes_reduce_scatterv(int size, int rank, const size_t *counts,
                                              kfac_dtype t);
uint64_t kfac_comm_ring_bytes_allgatherv(int size, int rank, const size_t *counts, kfac_dtype t);

#ifdef __cplusplus
}
#endif
#endif
