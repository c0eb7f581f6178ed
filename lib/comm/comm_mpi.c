/* comm_mpi.c - the communicator on Open MPI, host buffers.  float32 uses
 * MPI_FLOAT/MPI_SUM; the 16-bit types travel as MPI_UINT16_T with a
 * user-defined sum.  Errors return (MPI_ERRORS_RETURN on our duplicate),
 * so a failed collective becomes a KFAC_ECOMM status with MPI's message. */
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>

#include "comm/comm_impl.h"

typedef struct mpi_impl {
    MPI_Comm comm;
    MPI_Op sum_f16, sum_bf16;
    int *counts, *displs; /* per-rank scratch for the v-collectives */
    MPI_Request pending[KFAC_COMM_MAX_PENDING];
    int num_pending;
} mpi_impl;

static void op_sum_f16(void *in, void *inout, int *len, MPI_Datatype *type)
{
    kfac__sum_f16(inout, in, (size_t)*len);
}

static void op_sum_bf16(void *in, void *inout, int *len, MPI_Datatype *type)
{
    kfac__sum_bf16(inout, in, (size_t)*len);
}

static kfac_status check(int rc, const char *call)
{
    if (rc == MPI_SUCCESS) return KFAC_OK;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return KFAC_ERR(KFAC_ECOMM, "%s failed: %s", call, msg);
}

static MPI_Datatype mpi_type(kfac_dtype t)
{
    return t == KFAC_F32 ? MPI_FLOAT : t == KFAC_F64 ? MPI_DOUBLE : MPI_UINT16_T;
}

static MPI_Op mpi_sum(const mpi_impl *m, kfac_dtype t)
{
    return t == KFAC_F16 ? m->sum_f16 : t == KFAC_BF16 ? m->sum_bf16 : MPI_SUM;
}

static kfac_status to_int(size_t count, int *out)
{
    if (count > INT_MAX)
        return KFAC_ERR(KFAC_EINVAL, "comm: %zu elements in one MPI call (limit %d)", count,
                        INT_MAX);
    *out = (int)count;
    return KFAC_OK;
}

static kfac_status fill_counts(kfac_comm *c, const size_t *counts)
{
    mpi_impl *m = c->impl;
    size_t off = 0;
    for (int r = 0; r < c->size; r++) {
        KFAC_TRY(to_int(counts[r], &m->counts[r]));
        KFAC_TRY(to_int(off, &m->displs[r]));
        off += counts[r];
    }
    return KFAC_OK;
}

static kfac_status mpi_allreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t)
{
    mpi_impl *m = c->impl;
    int n = 0;
    KFAC_TRY(to_int(count, &n));
    return check(MPI_Allreduce(MPI_IN_PLACE, buf, n, mpi_type(t), mpi_sum(m, t), m->comm),
                 "MPI_Allreduce");
}

static kfac_status mpi_reduce_scatterv(kfac_comm *c, const void *send, void *recv,
                                       const size_t *counts, kfac_dtype t)
{
    mpi_impl *m = c->impl;
    KFAC_TRY(fill_counts(c, counts));
    return check(MPI_Reduce_scatter(send, recv, m->counts, mpi_type(t), mpi_sum(m, t), m->comm),
                 "MPI_Reduce_scatter");
}

static kfac_status mpi_allgatherv(kfac_comm *c, void *buf, const size_t *counts, kfac_dtype t)
{
    mpi_impl *m = c->impl;
    KFAC_TRY(fill_counts(c, counts));
    return check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, m->counts, m->displs,
                                mpi_type(t), m->comm),
                 "MPI_Allgatherv");
}

static kfac_status mpi_bcast(kfac_comm *c, void *buf, size_t count, kfac_dtype t, int root)
{
    mpi_impl *m = c->impl;
    int n = 0;
    KFAC_TRY(to_int(count, &n));
    return check(MPI_Bcast(buf, n, mpi_type(t), root, m->comm), "MPI_Bcast");
}

static kfac_status mpi_barrier(kfac_comm *c)
{
    return check(MPI_Barrier(((mpi_impl *)c->impl)->comm), "MPI_Barrier");
}

static kfac_status mpi_wait_all(kfac_comm *c)
{
    mpi_impl *m = c->impl;
    int rc = MPI_Waitall(m->num_pending, m->pending, MPI_STATUSES_IGNORE);
    m->num_pending = 0;
    return check(rc, "MPI_Waitall");
}

static kfac_status mpi_iallreduce(kfac_comm *c, void *buf, size_t count, kfac_dtype t)
{
    mpi_impl *m = c->impl;
    int n = 0;
    KFAC_TRY(to_int(count, &n));
    if (m->num_pending == KFAC_COMM_MAX_PENDING) KFAC_TRY(mpi_wait_all(c));
    return check(MPI_Iallreduce(MPI_IN_PLACE, buf, n, mpi_type(t), mpi_sum(m, t), m->comm,
                                &m->pending[m->num_pending++]),
                 "MPI_Iallreduce");
}

static kfac_status mpi_progress(kfac_comm *c)
{
    mpi_impl *m = c->impl;
    int done;
    if (m->num_pending == 0) return KFAC_OK;
    return check(MPI_Testall(m->num_pending, m->pending, &done, MPI_STATUSES_IGNORE),
                 "MPI_Testall");
}

static void mpi_abort(kfac_comm *c, int code) { MPI_Abort(((mpi_impl *)c->impl)->comm, code); }

static void mpi_destroy(kfac_comm *c)
{
    mpi_impl *m = c->impl;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) {
        if (m->num_pending) MPI_Waitall(m->num_pending, m->pending, MPI_STATUSES_IGNORE);
        MPI_Op_free(&m->sum_f16);
        MPI_Op_free(&m->sum_bf16);
        MPI_Comm_free(&m->comm);
    }
    free(m->counts);
    free(m->displs);
    free(m);
}

static const kfac_comm_ops mpi_ops = {
    .kind = "mpi",
    .allreduce = mpi_allreduce,
    .reduce_scatterv = mpi_reduce_scatterv,
    .allgatherv = mpi_allgatherv,
    .bcast = mpi_bcast,
    .barrier = mpi_barrier,
    .iallreduce = mpi_iallreduce,
    .progress = mpi_progress,
    .wait_all = mpi_wait_all,
    .abort = mpi_abort,
    .destroy = mpi_destroy,
};

kfac_status kfac_comm_mpi(const void *mpi_comm, const int *node_of_rank, kfac_comm **out)
{
    int initialized = 0, rank, size;
    *out = NULL;
    MPI_Initialized(&initialized);
    if (!initialized) return KFAC_ERR(KFAC_ECOMM, "comm: MPI is not initialized");
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m) return KFAC_ERR(KFAC_ENOMEM, "comm: out of memory");
    kfac_status st = check(MPI_Comm_dup(*(const MPI_Comm *)mpi_comm, &m->comm), "MPI_Comm_dup");
    if (st != KFAC_OK) {
        free(m);
        return st;
    }
    MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m->comm, &rank);
    MPI_Comm_size(m->comm, &size);
    MPI_Op_create(op_sum_f16, 1, &m->sum_f16);
    MPI_Op_create(op_sum_bf16, 1, &m->sum_bf16);
    m->counts = malloc((size_t)size * sizeof(int));
    m->displs = malloc((size_t)size * sizeof(int));
    if (!m->counts || !m->displs) st = KFAC_ERR(KFAC_ENOMEM, "comm: out of memory");
    if (st == KFAC_OK) st = kfac__comm_create(&mpi_ops, rank, size, node_of_rank, m, out);
    if (st != KFAC_OK) {
        kfac_comm tmp = {.impl = m};
        mpi_destroy(&tmp);
    }
    return st;
}
