/* comm_nccl.c - the communicator on NCCL, device buffers.  Every call is
 * issued on the communicator's own stream and completes before it returns
 * (iallreduce excepted: wait_all synchronizes), so callers can treat it as
 * the MPI one.  NCCL has no v-collectives: reduce_scatterv is a group of
 * ncclReduce calls, one per owner block, and allgatherv a group of
 * ncclBroadcast calls, one per source block. */
#include "comm/comm_impl.h"

#ifndef KFAC_HAVE_CUDA

kfac_status kfac_comm_nccl(const void *mpi_comm, const int *node_of_rank, int device,
                           kfac_comm **out)
{
    *out = NULL;
    return KFAC_ERR(KFAC_ENOTSUP, "comm: this build has no CUDA, so no NCCL communicator");
}

#else

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <stdlib.h>

typedef struct nccl_impl {
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
} nccl_impl;

static ncclDataType_t nccl_type(kfac_dtype t)
{
    return t == KFAC_F32   ? ncclFloat32
           : t == KFAC_F64 ? ncclFloat64
           : t == KFAC_F16 ? ncclFloat16
                           : ncclBfloat16;
}

static kfac_status check_nccl(ncclResult_t rc, const char *call)
{
    if (rc == ncclSuccess) return KFAC_OK;
    return KFAC_ERR(KFAC_ECOMM, "%s failed: %s", call, ncclGetErrorString(rc));
}

static kfac_status sync_stream(nccl_impl *n)
{
    cudaError_t rc = cudaStreamSynchronize(n->stream);
    if (rc != cudaSuccess)
        return KFAC_ERR(KFAC_ECOMM, "cudaStreamSynchronize after NCCL: %s", cudaGetErrorString(rc));
    return KFAC_OK;
}

static kfac_status nccl_allreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t)
{
    nccl_impl *n = c->impl;
    KFAC_TRY(check_nccl(ncclAllReduce(buf, buf, count, nccl_type(t), ncclSum, n->comm, n->stream),
                        "ncclAllReduce"));
    return sync_stream(n);
}

static kfac_status nccl_reduce_scatterv(kfac_comm *c, const void *send, void *recv,
                                        const size_t *counts, kfac_dtype t)
{
    nccl_impl *n = c->impl;
    size_t off = 0, elem = kfac_dtype_size(t);
    KFAC_TRY(check_nccl(ncclGroupStart(), "ncclGroupStart"));
    for (int r = 0; r < c->size; r++) {
        ncclResult_t rc = ncclReduce((const char *)send + off * elem, r == c->rank ? recv : NULL,
                                     counts[r], nccl_type(t), ncclSum, r, n->comm, n->stream);
        if (rc != ncclSuccess) {
            ncclGroupEnd();
            return check_nccl(rc, "ncclReduce");
        }
        off += counts[r];
    }
    KFAC_TRY(check_nccl(ncclGroupEnd(), "ncclGroupEnd"));
    return sync_stream(n);
}

static kfac_status nccl_allgatherv(kfac_comm *c, void *buf, const size_t *counts, kfac_dtype t)
{
    nccl_impl *n = c->impl;
    size_t off = 0, elem = kfac_dtype_size(t);
    KFAC_TRY(check_nccl(ncclGroupStart(), "ncclGroupStart"));
    for (int r = 0; r < c->size; r++) {
        char *block = (char *)buf + off * elem;
        ncclResult_t rc = ncclBroadcast(block, block, counts[r], nccl_type(t), r, n->comm, n->stream);
        if (rc != ncclSuccess) {
            ncclGroupEnd();
            return check_nccl(rc, "ncclBroadcast");
        }
        off += counts[r];
    }
    KFAC_TRY(check_nccl(ncclGroupEnd(), "ncclGroupEnd"));
    return sync_stream(n);
}

static kfac_status nccl_bcast(kfac_comm *c, void *buf, size_t count, kfac_dtype t, int root)
{
    nccl_impl *n = c->impl;
    KFAC_TRY(check_nccl(ncclBroadcast(buf, buf, count, nccl_type(t), root, n->comm, n->stream),
                        "ncclBroadcast"));
    return sync_stream(n);
}

static kfac_status nccl_barrier(kfac_comm *c)
{
    /* A one-element all-reduce orders every rank, as a barrier must. */
    nccl_impl *n = c->impl;
    float *one = NULL;
    if (cudaMalloc((void **)&one, sizeof *one) != cudaSuccess)
        return KFAC_ERR(KFAC_ENOMEM, "comm: cudaMalloc for the NCCL barrier failed");
    cudaMemsetAsync(one, 0, sizeof *one, n->stream);
    kfac_status st = nccl_allreduce(c, one, 1, KFAC_F32);
    cudaFree(one);
    return st;
}

static kfac_status nccl_iallreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t)
{
    nccl_impl *n = c->impl;
    return check_nccl(ncclAllReduce(buf, buf, count, nccl_type(t), ncclSum, n->comm, n->stream),
                      "ncclAllReduce");
}

static kfac_status nccl_wait_all(kfac_comm *c) { return sync_stream(c->impl); }

static void nccl_abort(kfac_comm *c, int code)
{
    ncclCommAbort(((nccl_impl *)c->impl)->comm);
    MPI_Abort(MPI_COMM_WORLD, code);
}

static void nccl_destroy(kfac_comm *c)
{
    nccl_impl *n = c->impl;
    if (n->comm) ncclCommDestroy(n->comm);
    if (n->stream) cudaStreamDestroy(n->stream);
    free(n);
}

static const kfac_comm_ops nccl_ops = {
    .kind = "nccl",
    .allreduce = nccl_allreduce,
    .reduce_scatterv = nccl_reduce_scatterv,
    .allgatherv = nccl_allgatherv,
    .bcast = nccl_bcast,
    .barrier = nccl_barrier,
    .iallreduce = nccl_iallreduce,
    .wait_all = nccl_wait_all,
    .abort = nccl_abort,
    .destroy = nccl_destroy,
};

kfac_status kfac_comm_nccl(const void *mpi_comm, const int *node_of_rank, int device,
                           kfac_comm **out)
{
    MPI_Comm comm = *(const MPI_Comm *)mpi_comm;
    int rank, size;
    *out = NULL;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    ncclUniqueId id;
    if (rank == 0) KFAC_TRY(check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId"));
    if (MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, comm) != MPI_SUCCESS)
        return KFAC_ERR(KFAC_ECOMM, "comm: MPI_Bcast of the NCCL unique id failed");
    nccl_impl *n = calloc(1, sizeof *n);
    if (!n) return KFAC_ERR(KFAC_ENOMEM, "comm: out of memory");
    n->device = device;
    kfac_status st = KFAC_OK;
    if (cudaSetDevice(device) != cudaSuccess || cudaStreamCreate(&n->stream) != cudaSuccess)
        st = KFAC_ERR(KFAC_ENODEV, "comm: cannot use CUDA device %d for NCCL", device);
    if (st == KFAC_OK)
        st = check_nccl(ncclCommInitRank(&n->comm, size, id, rank), "ncclCommInitRank");
    if (st == KFAC_OK) st = kfac__comm_create(&nccl_ops, rank, size, node_of_rank, n, out);
    if (st != KFAC_OK) {
        kfac_comm tmp = {.impl = n};
        nccl_destroy(&tmp);
    }
    return st;
}

#endif
